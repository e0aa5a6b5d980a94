"""`soups run` on sweeps not shaped like the default (one trial, two, a handful in parallel, another seed, a
kitchen of some recipes), each ending with a champion; and the same short sweep run twice, in two empty
folders by two processes, giving the same bytes, the same trial values, the same leaderboard and champion."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from cli.main import main
from soups.checkpoint import weights_digest
from soups.names import stored_name
from soups.recipes import DEFAULT_KITCHEN
from tests.helpers import cli_environment

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "digits-soups"


def _config_file(root: Path, pretrained: Path | None, **sections) -> Path:
    """The paper's search space (RandAugment, mixup, label smoothing on or off) with 1-2 epochs per trial."""
    config = {
        "tracking": {"root": str(root)},
        "space": {
            "lr": {"kind": "loguniform", "low": 1e-5, "high": 3e-4},
            "epochs": {"kind": "int", "low": 1, "high": 2},
            "label_smoothing": {"kind": "uniform", "low": 0.0, "high": 0.2, "or_zero": True},
            "mixup_alpha": {"kind": "uniform", "low": 0.0, "high": 0.8, "or_zero": True},
            "randaugment_m": {"kind": "int", "low": 1, "high": 20},
            "randaugment_n": {"kind": "int", "low": 0, "high": 2},
        },
        "kitchen": {"recipes": DEFAULT_KITCHEN, "bootstrap": 200},  # every recipe and label; learned: 5 epochs
        **sections,
    }
    if pretrained is not None:
        config["model"] = {"pretrained": str(pretrained)}
    path = root.parent / f"{root.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _client(root: Path) -> MlflowClient:
    uri = f"sqlite:///{(root / 'mlflow.db').resolve()}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


SHAPES = {
    "one-trial": ({"sweep": {"n_trials": 1}}, []),
    "two-trials-another-seed": ({"sweep": {"n_trials": 2, "seed": 7}, "train": {"seed": 11}}, []),
    "a-handful-two-at-a-time": ({"sweep": {"n_trials": 5, "parallel": 2, "sampler": "random"}}, []),
    "some-recipes-and-a-middle-alpha": (
        {"sweep": {"n_trials": 2, "seed": 3}},
        ["kitchen.recipes=[uniform, ensemble, {name: wise_ft, options: {alphas: [0.35, 0.5]}}]"],
    ),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_a_sweep_of_this_shape_finishes_with_a_champion(shape, prefect_server, pretrained_checkpoint, tmp_path):
    sections, sets = SHAPES[shape]
    root = tmp_path / "soups-data"
    config = _config_file(root, pretrained_checkpoint, **sections)
    assert main(["run", str(config), *[x for s in sets for x in ("--set", s)]]) == 0

    client = _client(root)
    champion = client.get_model_version_by_alias(EXPERIMENT, "champion")
    soups = client.search_model_versions(f"name='{EXPERIMENT}'")
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    logged = {model.name for model in client.search_logged_models([experiment_id])}
    for version in soups:
        assert version.tags["stored_name"] == stored_name(version.tags["candidate"])
        assert version.tags["stored_name"] in logged
    assert str(champion.version) in {str(v.version) for v in soups}
    (kitchen,) = client.search_runs([experiment_id], "tags.kind = 'kitchen'")
    assert kitchen.info.status == "FINISHED" and kitchen.data.tags["promotion.candidate_version"]
    trials = client.search_runs([experiment_id], "tags.kind = 'ingredient'")
    assert {"runtime.torch_threads", "runtime.torch", "runtime.timm", "train.seed"} <= set(trials[0].data.params)
    if shape == "one-trial":  # a soup of one: the recipes that measure pairs say why they were left out
        assert "model_stock" in kitchen.data.tags["skipped_recipes"]
    if shape == "some-recipes-and-a-middle-alpha":  # the best WiSE-FT is a real mix: registered by its stored name
        (wise,) = [v for v in soups if v.tags["recipe"] == "wise_ft"]
        assert wise.tags["candidate"] in ("wise_ft_0.35", "wise_ft_0.50")
        assert wise.tags["stored_name"] in ("wise_ft_0p35", "wise_ft_0p50")


def _run_in_a_fresh_process(root: Path) -> None:
    config = _config_file(root, None, sweep={"n_trials": 3}, pretrain={"epochs": 2})
    command = [sys.executable, "-m", "cli.main", "run", str(config)]
    done = subprocess.run(command, cwd=REPO, env=cli_environment(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


def _outcome(root: Path) -> dict:
    client = _client(root)
    ingredients = client.search_model_versions(f"name='{EXPERIMENT}-ingredients'")
    study = optuna.load_study(study_name=EXPERIMENT, storage=f"sqlite:///{root / 'optuna.db'}")
    (kitchen,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id], "tags.kind = 'kitchen'")
    champion = client.get_model_version_by_alias(EXPERIMENT, "champion")
    return {
        "start": [p.read_bytes() for p in sorted((root / "pretrained").glob("*.safetensors"))],
        # The tensors' sha256: the files' metadata names the start by its path, which is in another folder.
        "ingredients": {
            v.tags["trial_number"]: weights_digest(root / "cache" / v.tags["sha256"] / "weights.safetensors")
            for v in ingredients
        },
        "trials": [(t.params, t.value) for t in study.trials],
        "leaderboard": pd.read_csv(root / "kitchen" / kitchen.info.run_id / "leaderboard.csv"),
        "champion": (champion.tags["candidate"], champion.tags["weights_sha256"]),
    }


def test_the_same_short_sweep_twice_in_two_empty_folders_gives_the_same_result(tmp_path):
    first, second = tmp_path / "first" / "soups-data", tmp_path / "second" / "soups-data"
    for root in (first, second):
        root.parent.mkdir()
        _run_in_a_fresh_process(root)
    a, b = _outcome(first), _outcome(second)
    assert a["start"] == b["start"], "the pretrained start, byte for byte"
    assert a["ingredients"] == b["ingredients"] and len(a["ingredients"]) == 3, "ingredient weights by sha256"
    assert a["trials"] == b["trials"]
    pd.testing.assert_frame_equal(a["leaderboard"], b["leaderboard"], check_exact=True)  # every cell
    assert len(a["leaderboard"]) > 20, "every recipe and ingredient row"
    assert a["champion"] == b["champion"]
