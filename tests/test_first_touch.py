"""A new user's first commands: `soups --version`, and `soups serve` before anything is promoted (one line, no
traceback, nothing created), in a fresh folder and beside a store that holds no champion yet."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from soups.config import load_config
from tasks.adapters.tracking import ensure_experiment

SOUPS = str(Path(sys.executable).with_name("soups"))


def _soups(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([SOUPS, *argv], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_soups_version_names_the_installed_distribution(tmp_path):
    done = _soups("--version", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == f"soups {version('model-soups')}"


def test_serve_in_a_fresh_folder_is_one_line_and_creates_nothing(tmp_path):
    done = _soups("serve", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "nothing is promoted as digits-soups@champion yet" in done.stderr and "soups run" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_serve_beside_a_store_without_a_champion_is_one_line(tmp_path):
    config = load_config(None, {"tracking.root": str(tmp_path / "data")})
    ensure_experiment(config)
    done = _soups("serve", "--set", f"tracking.root={tmp_path / 'data'}", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "soups serve: error: nothing is promoted as digits-soups@champion yet: run `soups run` (or `soups promote`) "
        "first"
    ]
