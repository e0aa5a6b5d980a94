"""Two kitchens cooking one study at once: whichever promotes last compares against the champion the other
set (promotion holds a lock), so the alias ends on the better model, and on weights that verify."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient

from soups.checkpoint import weights_digest
from tasks.adapters.packaging import download_model_weights
from tests.helpers import cli_environment

REPO = Path(__file__).resolve().parents[2]
SPACE = json.dumps(
    {"lr": {"kind": "loguniform", "low": 3e-4, "high": 1e-3}, "epochs": {"kind": "int", "low": 1, "high": 1}}
)


def _soups(root: Path, pretrained: Path, *argv: str) -> list[str]:
    sets = {"tracking.root": root, "model.pretrained": pretrained, "space": SPACE, "kitchen.bootstrap": 0}
    return [sys.executable, "-m", "cli.main", *argv, *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]


def test_two_kitchens_finishing_together_leave_the_champion_on_the_better_verified_model(
    tmp_path, pretrained_checkpoint
):
    root = tmp_path / "data"
    sweep = _soups(root, pretrained_checkpoint, "sweep", "--set", "sweep.n_trials=3", "--set", "sweep.sampler=random")
    done = subprocess.run(sweep, cwd=REPO, env=cli_environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    menus = (["best"], ["uniform", "greedy"])
    kitchens = [
        subprocess.Popen(
            _soups(root, pretrained_checkpoint, "kitchen", "--set", f"kitchen.recipes={json.dumps(menu)}"),
            cwd=REPO,
            env=cli_environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for menu in menus
    ]
    outputs = [kitchen.communicate(timeout=900)[0] for kitchen in kitchens]
    for kitchen, output in zip(kitchens, outputs, strict=True):
        assert kitchen.returncode == 0, output[-3000:]

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    versions = client.search_model_versions("name='digits-soups'")
    assert {v.tags["recipe"] for v in versions} >= {"best", "uniform", "greedy"}
    champion = client.get_model_version_by_alias("digits-soups", "champion")
    assert float(champion.tags["heldout"]) == max(float(v.tags["heldout"]) for v in versions)
    weights = download_model_weights(client, "digits-soups", str(champion.version), tmp_path / "champion")
    assert weights_digest(weights) == champion.tags["weights_sha256"]
