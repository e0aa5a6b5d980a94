"""ARCHITECTURE.md stays true: it names every module of the top-level packages, and every module file or
folder it names exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAP = (REPO / "ARCHITECTURE.md").read_text()
PACKAGES = ("soups", "tasks", "flows", "cli", "deployments")


def _modules() -> list[Path]:
    return sorted(
        path.relative_to(REPO)
        for package in PACKAGES
        for path in (REPO / package).rglob("*.py")
        if path.name != "__init__.py" and "__pycache__" not in path.parts
    )


def _named(module: Path) -> bool:
    """Named as `name` (a code span), name.py, or by its path."""
    return any(form in MAP for form in (f"`{module.stem}`", f"{module.stem}.py", module.as_posix()))


def test_every_module_of_the_packages_is_named_in_the_map():
    modules = _modules()
    assert len(modules) > 50
    unnamed = [m.as_posix() for m in modules if not _named(m)]
    assert not unnamed, f"ARCHITECTURE.md does not name {unnamed}"


def test_every_module_file_and_folder_the_map_names_exists():
    names = {m.name for m in _modules()} | {p.name for p in (REPO / "deployments").iterdir()}
    files = set(re.findall(r"\b([\w/]+\.(?:py|yaml))\b", MAP))
    missing = [f for f in files if not ((REPO / f).exists() if "/" in f else f in names)]
    folders = set(re.findall(r"`((?:soups|tasks|flows|cli|deployments)/[\w/]*)`", MAP))
    missing += [f for f in folders if not (REPO / f).exists()]
    assert len(files) > 20
    assert not missing, f"ARCHITECTURE.md names {sorted(missing)}, which do not exist"
