"""Bad ingredients give the specific error, name the file, and no soup file is written."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from cli.main import main
from soups.checkpoint import (
    CheckpointError,
    IncompatibleCheckpointsError,
    NonFiniteTensorError,
    save_state_dict,
)
from soups.recipes import cook
from tests.helpers import random_state_dict, write_ingredients


def _variant(tmp_path, name, change):
    sd = random_state_dict(99)
    change(sd)
    return save_state_dict(sd, tmp_path / f"{name}.safetensors")


def _cook_cli(tmp_path, inputs, capsys):
    out = tmp_path / "soup.safetensors"
    code = main(["cook", "uniform", "--out", str(out), *map(str, inputs)])
    return code, out, capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("missing-key", lambda sd: sd.pop("layer.bias"), "missing key 'layer.bias'"),
        ("extra-key", lambda sd: sd.update(extra=torch.zeros(2)), "unexpected key 'extra'"),
        (
            "shape",
            lambda sd: sd.update({"layer.weight": torch.zeros(6, 4)}),
            "'layer.weight' has shape [6, 4]",
        ),
        ("dtype", lambda sd: sd.update({"layer.bias": torch.zeros(6).half()}), "'layer.bias' has dtype F16"),
    ],
)
def test_incompatible_checkpoints_are_named(tmp_path, capsys, name, change, message):
    good = write_ingredients(tmp_path, [1, 2])
    bad = _variant(tmp_path, name, change)
    with pytest.raises(IncompatibleCheckpointsError) as caught:
        cook("uniform", [*good, type(good[0])(bad)])
    assert message in str(caught.value) and str(bad) in str(caught.value)

    code, out, err = _cook_cli(tmp_path, [good[0].path, bad, good[1].path], capsys)
    assert code != 0 and message in err and not out.exists()


def test_truncated_file(tmp_path, capsys):
    good = write_ingredients(tmp_path, [1, 2])
    data = good[1].path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 40])
    code, out, err = _cook_cli(tmp_path, [good[0].path, truncated], capsys)
    assert code != 0 and "truncated" in err and str(truncated) in err and not out.exists()


def test_garbage_and_missing_files(tmp_path, capsys):
    good = write_ingredients(tmp_path, [1])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    code, out, err = _cook_cli(tmp_path, [good[0].path, garbage], capsys)
    assert code != 0 and "unreadable safetensors header" in err and not out.exists()

    missing = tmp_path / "nowhere.safetensors"
    code, out, err = _cook_cli(tmp_path, [good[0].path, missing], capsys)
    assert code != 0 and f"checkpoint not found: {missing}" in err and not out.exists()


def test_nan_tensor_is_reported_per_ingredient(tmp_path, capsys):
    good = write_ingredients(tmp_path, [1, 2])
    poisoned = _variant(tmp_path, "nan", lambda sd: sd["layer.weight"].__setitem__((0, 0), float("nan")))
    with pytest.raises(NonFiniteTensorError) as caught:
        cook("uniform", [*good, type(good[0])(poisoned)])
    assert str(poisoned) in str(caught.value) and "'layer.weight' has 1 NaN/inf" in str(caught.value)
    code, out, err = _cook_cli(tmp_path, [*[g.path for g in good], poisoned], capsys)
    assert code != 0 and "NaN/inf" in err and not out.exists()


def test_existing_output_survives_a_failed_cook(tmp_path, capsys):
    good = write_ingredients(tmp_path, [1])
    out = tmp_path / "soup.safetensors"
    out.write_bytes(b"previous soup")
    code = main(["cook", "uniform", "--out", str(out), str(good[0].path), str(tmp_path / "missing.safetensors")])
    assert code != 0 and out.read_bytes() == b"previous soup"


def test_cli_writes_a_loadable_soup_with_lineage(tmp_path):
    from safetensors import safe_open

    good = write_ingredients(tmp_path, [1, 2, 3])
    out = tmp_path / "soup.safetensors"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.main",
            "cook",
            "uniform",
            "--out",
            str(out),
            *[str(g.path) for g in good],
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["recipe"] == "uniform"
        assert f.metadata()["ingredients"].count(".safetensors") == 3
        assert torch.isfinite(f.get_tensor("layer.weight")).all()


_LOADED = "print(sorted(m for m in ('prefect', 'mlflow', 'optuna', 'torch') if m in sys.modules))"


def _modules_loaded_by(argv: list[str]) -> str:
    call = f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass"
    script = f"import sys\nfrom cli.main import main\n{call}\n{_LOADED}"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return result.stdout.strip().splitlines()[-1]


def test_help_and_cook_never_load_orchestration_packages(tmp_path):
    assert _modules_loaded_by(["--help"]) == "[]"
    good = write_ingredients(tmp_path, [1, 2])
    argv = ["cook", "uniform", "--out", str(tmp_path / "s.safetensors"), *[str(g.path) for g in good]]
    assert _modules_loaded_by(argv) == "['torch']"


def test_reading_a_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        cook("uniform", [type(write_ingredients(tmp_path, [1])[0])(tmp_path)])


def test_cli_cooks_any_file_recipe_with_a_base_and_named_params(tmp_path, capsys):
    from soups.checkpoint import load_state_dict

    base = write_ingredients(tmp_path / "base", [7])[0].path
    good = write_ingredients(tmp_path, [1, 2])
    out = tmp_path / "ta.safetensors"
    argv = ["cook", "task_arithmetic", "--base", str(base), "--param", "lambda=0.5", "--out", str(out)]
    assert main([*argv, *[str(g.path) for g in good]]) == 0
    zero, a, b = (load_state_dict(p) for p in (base, good[0].path, good[1].path))
    key = "layer.weight"
    expected = zero[key] + 0.5 * ((a[key] - zero[key]) + (b[key] - zero[key]))
    assert torch.allclose(load_state_dict(out)[key], expected, atol=1e-6)
    assert main(["cook", "ties", "--out", str(tmp_path / "t.safetensors"), *[str(g.path) for g in good]]) == 2
    assert "pass --base" in capsys.readouterr().err
    assert (
        main(
            [
                "cook",
                "ties",
                "--base",
                str(base),
                "--param",
                "densty=0.2",
                "--out",
                str(tmp_path / "t.safetensors"),
                *[str(g.path) for g in good],
            ]
        )
        == 2
    )
    assert "allowed options: density" in capsys.readouterr().err
    assert main(["cook", "uniform", "--out", str(tmp_path), *[str(g.path) for g in good]]) == 2
    assert "is a directory" in capsys.readouterr().err
