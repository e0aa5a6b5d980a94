"""The domain library stays a library: nothing under soups/ pulls in orchestration or tracking."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import soups

FORBIDDEN = ("prefect", "mlflow", "optuna", "flows", "tasks", "cli")


def test_importing_every_soups_module_loads_no_orchestration_package():
    modules = sorted(m.name for m in pkgutil.walk_packages(soups.__path__, "soups."))
    assert len(modules) > 15, modules
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(sorted(m for m in {FORBIDDEN!r} if any(k == m or k.startswith(m + '.') for k in sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout


def test_no_soups_source_names_an_orchestration_package():
    """A static check too, so a lazy import inside a function cannot slip through."""
    offenders = []
    for path in Path(soups.__file__).parent.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            words = line.strip().split()
            if len(words) >= 2 and words[0] in ("import", "from") and words[1].split(".")[0] in FORBIDDEN:
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, offenders


@pytest.mark.parametrize("recipe", ["uniform", "ties"])
def test_cooking_from_files_loads_no_image_model_or_plotting_package(tmp_path, recipe):
    """`soups cook` and the merges read safetensors only: torchvision, open_clip, timm and matplotlib stay
    unloaded, for the plain mean and for a task-vector merge on a zero-shot start."""
    from safetensors.torch import save_file

    files = []
    for k in range(3):
        files.append(str(tmp_path / f"{k}.safetensors"))
        save_file({"w": torch.full((4,), float(k))}, files[-1])
    out = str(tmp_path / "soup.safetensors")
    argv = ["cook", recipe, *files[1:], "--out", out, *(["--base", files[0]] if recipe == "ties" else [])]
    script = (
        f"import sys\nfrom cli.main import main\nassert main({argv!r}) == 0\n"
        "print(sorted(m for m in ('torchvision', 'open_clip', 'timm', 'matplotlib') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout
    assert Path(out).is_file()
