"""`soups import`: checkpoints fine-tuned elsewhere become ingredients the kitchen gathers like its own.

Real MLflow on sqlite in tmp_path; random-weight open_clip models stand in for the paper's released fine-tunes
(no weights can be downloaded). The project's tiny architecture has the same ViT key layout as ViT-B-32, so only
the round-trip test pays for the real ViT-B-32 key names and shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import pickletools
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from soups.checkpoint import CheckpointError, NonFiniteTensorError
from soups.config import PipelineConfig, load_config
from soups.importing import CheckpointImportError, UnsafeCheckpointError, convert, detect_format, read_checkpoint
from soups.models import create_clip, load_classifier, model_embed_dim, save_classifier

TINY, SMALL, VIT_B_32 = "soups-vit-tiny", "soups-vit-small", "ViT-B-32"
PAPER_TEXT_KEYS = {
    "model.token_embedding.weight",
    "model.positional_embedding",
    "model.ln_final.weight",
    "model.ln_final.bias",
    "model.text_projection",
    "model.logit_scale",
}


@pytest.fixture(autouse=True)
def _quiet_downloads(monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _clip(model_name: str, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, _, _, _ = create_clip(model_name)
    return model.eval()


def _head(model_name: str, num_classes: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "weight": torch.randn(num_classes, model_embed_dim(model_name), generator=g) * 100,
        "bias": torch.randn(num_classes, generator=g),
    }


def _paper_layout(model: nn.Module, head: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The released checkpoints' state dict: the paper's wrapper deleted CLIP's text ``transformer`` only."""
    kept = {f"model.{k}": v for k, v in model.state_dict().items() if not k.startswith("transformer.")}
    return {**kept, **{f"classification_head.{k}": v for k, v in head.items()}}


def _classifier_layout(model: nn.Module, head: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    visual = {f"visual.{k}": v for k, v in model.visual.state_dict().items()}
    return {**visual, **{f"head.{k}": v for k, v in head.items()}}


def _paper_file(folder: Path, name: str, model_name: str = TINY, seed: int = 0, classes: int = 4) -> Path:
    path = folder / name
    torch.save(_paper_layout(_clip(model_name, seed), _head(model_name, classes, seed)), path)
    return path


def _classifier_file(folder: Path, name: str, model_name: str = TINY, seed: int = 0, classes: int = 4) -> Path:
    from safetensors.torch import save_file

    path = folder / name
    save_file(_classifier_layout(_clip(model_name, seed), _head(model_name, classes, seed)), str(path))
    return path


@pytest.fixture(scope="module")
def tracking_root(tmp_path_factory) -> Path:
    """One MLflow database for the module (creating one takes seconds); each test has its own experiment."""
    return tmp_path_factory.mktemp("tracking")


@pytest.fixture
def make_config(tracking_root, request) -> Callable[..., PipelineConfig]:
    experiment = re.sub(r"[^A-Za-z0-9_.-]", "-", request.node.name.removeprefix("test_"))

    def make(model_name: str = TINY) -> PipelineConfig:
        overrides = {"experiment": experiment, "model.name": model_name, "tracking.root": str(tracking_root)}
        return load_config(None, overrides)

    return make


def _versions(config: PipelineConfig) -> list:
    from tasks.adapters.tracking import client_for, ingredients_model_name

    client = client_for(config.tracking)
    return sorted(
        client.search_model_versions(f"name='{ingredients_model_name(config)}'"), key=lambda v: int(v.version)
    )


def _registered_checkpoint(config: PipelineConfig, version, into: Path) -> Path:
    import mlflow

    from tasks.adapters.tracking import weights_uri

    uri = config.tracking.resolved_mlflow_uri()
    return Path(
        mlflow.artifacts.download_artifacts(artifact_uri=weights_uri(version), dst_path=str(into), tracking_uri=uri)
    )


# ----------------------------------------------------------------------------------------------- the paper's


def test_paper_vit_b_32_checkpoint_round_trips_to_the_same_logits(tmp_path, make_config):
    """A checkpoint in the released layout, registered, loads into ViT-B-32 and computes the paper's logits:
    head(normalize(visual(x))), the scale already folded into the head as in the paper's zero-shot init."""
    from tasks.importing import import_checkpoints

    model = _clip(VIT_B_32, seed=0)
    head = _head(VIT_B_32, 3, seed=0)
    source = tmp_path / "model_0.pt"
    torch.save(_paper_layout(model, head), source)
    config = make_config(VIT_B_32)

    (version,) = import_checkpoints(config, [source], "model-soups")

    (registered,) = _versions(config)
    assert str(registered.version) == version and registered.tags["format"] == "model-soups"
    path = _registered_checkpoint(config, registered, tmp_path / "downloaded")
    with safe_open(str(path), framework="pt") as f:
        keys = f.keys()
        assert not any(k.startswith(("model.", "classification_head.")) for k in keys)
        assert f.metadata()["source_file"] == str(source.resolve()) and f.metadata()["num_classes"] == "3"
    imported = load_classifier(path, VIT_B_32, 3)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = F.normalize(model.visual(images), dim=-1) @ head["weight"].T + head["bias"]
        torch.testing.assert_close(imported(images), expected, rtol=1e-5, atol=1e-4)


def test_nested_training_checkpoint_with_dataparallel_prefix_is_unwrapped(tmp_path):
    layout = _paper_layout(_clip(TINY, seed=3), _head(TINY, 4, seed=3))
    nested = tmp_path / "epoch_9.pt"
    torch.save({"epoch": 9, "state_dict": {f"module.{k}": v for k, v in layout.items()}}, nested)

    assert set(read_checkpoint(nested)) == set(layout)
    converted = convert(nested, TINY, "auto", tmp_path / "out")
    assert converted.format == "model-soups" and converted.num_classes == 4
    assert converted.notes and "QuickGELU" in converted.notes[0]  # the paper's models are OpenAI CLIP
    with safe_open(str(converted.path), framework="pt") as f:
        assert torch.equal(f.get_tensor("head.weight"), layout["classification_head.weight"])
        assert not PAPER_TEXT_KEYS & set(f.keys())


# -------------------------------------------------------------------------------------------- open_clip format


def test_open_clip_safetensors_and_pt_import_with_auto_detection(tmp_path, make_config):
    from tasks.importing import import_checkpoints

    config = make_config()
    ours = _classifier_file(tmp_path, "ours.safetensors", seed=1)
    as_pt = tmp_path / "ours-as-pt.pt"
    torch.save(_classifier_layout(_clip(TINY, seed=2), _head(TINY, 4, seed=2)), as_pt)
    paper = _paper_file(tmp_path, "model_7.pt", seed=7)
    assert detect_format(read_checkpoint(ours)) == "open_clip" == detect_format(read_checkpoint(as_pt))
    assert detect_format(read_checkpoint(paper)) == "model-soups"

    versions = import_checkpoints(config, [ours, as_pt, paper])

    registered = _versions(config)
    assert versions == [str(v.version) for v in registered] == ["1", "2", "3"]
    assert [v.tags["format"] for v in registered] == ["open_clip", "open_clip", "model-soups"]
    first = registered[0].tags
    assert first["study"] == config.experiment and first["model_name"] == TINY and first["heldout_accuracy"] == "nan"
    assert first["weights"] == "ours.safetensors" and first["source_file"] == str(ours.resolve())
    assert [v.tags["trial_number"] for v in registered] == ["0", "1", "2"]
    path = _registered_checkpoint(config, registered[0], tmp_path / "downloaded")
    assert torch.equal(load_classifier(path, TINY, 4).head.weight, _head(TINY, 4, seed=1)["weight"])


def test_detect_format_names_the_expected_layouts():
    with pytest.raises(CheckpointImportError, match=r"w\.pt: cannot tell its layout .*encoder\.weight.*--format"):
        detect_format(["encoder.weight", "fc.bias"], "w.pt")


# ------------------------------------------------------------------------------------------------- refusals


def _plant(path: Path, marker: Path, kind: str) -> None:
    """A .pt whose unpickling would run ``touch marker`` (or, for ``namespace``, build an arbitrary object)."""

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    if kind == "torch.save":
        torch.save({"visual.conv1.weight": torch.zeros(1), "head.weight": Payload()}, path)
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"head.weight": Payload()}))
    else:
        torch.save({"state_dict": {"head.weight": torch.zeros(1)}, "args": argparse.Namespace(lr=1e-5)}, path)


@pytest.mark.parametrize("kind", ["torch.save", "pickle", "namespace"])
def test_a_pickle_that_needs_arbitrary_objects_is_refused_unrun(tmp_path, make_config, kind):
    from tasks.importing import import_checkpoints

    marker, planted = tmp_path / "MARKER", tmp_path / "model_1.pt"
    _plant(planted, marker, kind)
    config = make_config()

    with pytest.raises(UnsafeCheckpointError) as refused:
        import_checkpoints(config, [planted])

    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{planted}: refused")
    assert ("posix.system" in message) if kind == "torch.save" else True
    assert ("argparse.Namespace" in message) if kind == "namespace" else True
    assert not marker.exists() and _versions(config) == []
    if kind == "pickle":  # the plant is real: its opcodes call os.system (read, never run)
        arguments = [str(arg) for _, arg, _ in pickletools.genops(planted.read_bytes())]
        assert "system" in arguments and f"touch {marker}" in arguments


def test_a_checkpoint_of_another_architecture_is_refused_naming_the_mismatch(tmp_path, make_config):
    from tasks.importing import import_checkpoints

    small = _classifier_file(tmp_path, "small.safetensors", SMALL)
    config = make_config(TINY)

    with pytest.raises(CheckpointImportError) as refused:
        import_checkpoints(config, [small])

    message = str(refused.value)
    assert str(small) in message and "'soups-vit-tiny'" in message and "shape mismatches" in message
    assert "--model" in message and "\n" not in message
    assert _versions(config) == []


def test_an_architecture_other_than_the_studys_is_refused(tmp_path, make_config):
    from tasks.importing import import_checkpoints

    import_checkpoints(make_config(TINY), [_classifier_file(tmp_path, "tiny.safetensors", TINY)])
    with pytest.raises(
        ValueError, match=r"already holds ingredients of architecture soups-vit-tiny, not 'soups-vit-small'"
    ):
        import_checkpoints(make_config(SMALL), [_classifier_file(tmp_path, "small.safetensors", SMALL)])


@pytest.mark.parametrize("writer", [_classifier_file, _paper_file])
def test_nan_weights_are_refused(tmp_path, writer):
    path = writer(tmp_path, "diverged.pt" if writer is _paper_file else "diverged.safetensors")
    state_dict = read_checkpoint(path)
    key = next(k for k in state_dict if k.endswith("conv1.weight"))
    state_dict[key].view(-1)[0] = float("nan")
    if writer is _paper_file:
        torch.save(state_dict, path)
    else:
        from safetensors.torch import save_file

        save_file(state_dict, str(path))

    with pytest.raises(NonFiniteTensorError, match=r"diverged\.\w+: tensor 'visual\.conv1\.weight' has 1 NaN/inf"):
        convert(path, TINY, "auto", tmp_path / "out")
    assert not (tmp_path / "out" / "diverged.safetensors").exists()


# ------------------------------------------------------------------------------------ idempotence and kitchen


def test_importing_twice_registers_once(tmp_path, make_config, capsys):
    from tasks.importing import import_checkpoints

    config = make_config()
    paper = _paper_file(tmp_path, "model_3.pt", seed=3)
    assert import_checkpoints(config, [paper]) == ["1"]
    same_weights = tmp_path / "model_3.safetensors"
    save_classifier(
        load_classifier(_registered_checkpoint(config, _versions(config)[0], tmp_path / "d"), TINY, 4), same_weights
    )

    assert import_checkpoints(config, [paper, same_weights]) == ["1", "1"]

    assert len(_versions(config)) == 1
    out = capsys.readouterr().out
    assert "model_3.pt: skipped: this file is already version 1" in out
    assert "model_3.safetensors: skipped: the same weights is already version 1" in out


def test_the_kitchen_gathers_imported_ingredients_with_verified_checksums(tmp_path, make_config):
    from soups.checkpoint import file_sha256
    from tasks.gathering import gather_ingredients
    from tasks.importing import import_checkpoints

    config = make_config()
    files = [_paper_file(tmp_path, f"model_{i}.pt", seed=i) for i in range(3)]
    versions = import_checkpoints(config, files, "model-soups")

    refs = gather_ingredients.fn(config).refs

    registered = {str(v.version): v for v in _versions(config)}
    assert [r.version for r in refs] == versions == ["1", "2", "3"]
    for ref in refs:
        assert file_sha256(ref.checkpoint) == registered[ref.version].tags["sha256"]
        assert load_classifier(ref.checkpoint, TINY, 4).num_classes == 4


# ---------------------------------------------------------------------------------------------- command line


def _parse(argv: list[str]) -> argparse.Namespace:
    from cli.import_command import add_import_parser

    parser = argparse.ArgumentParser(prog="soups")
    add_import_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_imports_and_reports_errors_as_one_line(tmp_path, tracking_root, capsys):
    from cli.common import UsageError

    tracking = f"tracking.root={tracking_root}"
    paper = _paper_file(tmp_path, "model_5.pt", seed=5)
    args = _parse(["import", "--experiment", "paper", "--model", TINY, "--set", tracking, str(paper)])
    args.handler(args)
    out = capsys.readouterr().out
    assert "versions 1 of paper-ingredients" in out and "--set experiment=paper" in out

    planted = tmp_path / "evil.pt"
    _plant(planted, tmp_path / "MARKER", "torch.save")
    args = _parse(["import", "--experiment", "paper", "--model", TINY, "--set", tracking, str(planted)])
    with pytest.raises(UsageError) as refused:
        args.handler(args)
    assert "\n" not in str(refused.value) and not (tmp_path / "MARKER").exists()
    assert isinstance(refused.value.__cause__, CheckpointError)


def test_cli_help_loads_neither_torch_nor_mlflow():
    script = (
        "import argparse, sys\nfrom cli.import_command import add_import_parser\n"
        "parser = argparse.ArgumentParser(prog='soups')\nadd_import_parser(parser.add_subparsers())\n"
        "try:\n    parser.parse_args(['import', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'mlflow', 'prefect') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_the_kitchen_cooks_imported_fine_tunes_where_no_sweep_or_pretraining_ran(prefect_server, tmp_path):
    from safetensors.torch import save_file

    from flows.kitchen import kitchen_flow
    from tasks.adapters.tracking import client_for
    from tasks.importing import import_checkpoints

    start = _clip(TINY, 0)  # one start, three heads: fine-tunes of one model made elsewhere
    files = []
    for seed in range(3):
        path = tmp_path / f"elsewhere-{seed}.safetensors"
        save_file(_classifier_layout(start, _head(TINY, 10, seed)), str(path))
        files.append(path)
    settings = {
        "experiment": "elsewhere",
        "tracking.root": str(tmp_path / "root"),
        "kitchen.recipes": ["best", "uniform", "greedy", "wise_ft"],
        "kitchen.bootstrap": 0,
    }
    config = load_config(None, settings)  # digits, model.pretrained null, a pretrain section never run
    assert import_checkpoints(config, files, "open_clip") == ["1", "2", "3"]
    result = kitchen_flow(config)
    recipes = {row["recipe"] for row in result["leaderboard"]}
    assert {"ingredient", "best", "uniform", "greedy"} <= recipes and "wise_ft" not in recipes
    tags = client_for(config.tracking).get_run(result["run_id"]).data.tags
    assert json.loads(tags["skipped_recipes"]) == {"wise_ft": "needs base"}, "skipped with a note, not a crash"
    assert result["promotion"]["outcome"] == "champion (first)"
