"""What a lab adopts: a license and a citation at the root, a wheel that installs no generic top-level name (only
the library `soups`), every directly imported distribution declared with an upper bound where the suite
pins a major, a lock that `make` installs from, and PostgreSQL's tools found where Debian puts them."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

import deployments.processes as processes
from deployments.processes import StackError, require_postgres, tool_path

REPO = Path(__file__).resolve().parent.parent
LAYERS = ("soups", "tasks", "flows", "cli", "deployments")
# import name -> distribution, for the imports whose names differ from what pip installs
DISTRIBUTIONS = {
    "PIL": "pillow",
    "yaml": "pyyaml",
    "sklearn": "scikit-learn",
    "open_clip": "open-clip-torch",
    "psycopg2": "psycopg2-binary",
}


def _requirements() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    found = {}
    for spec in project["dependencies"]:
        name = re.split(r"[\[<>=!~ ]", spec, maxsplit=1)[0]
        found[name.lower().replace("_", "-")] = spec
    return found


def test_a_license_and_a_citation_of_the_software_that_asks_for_the_paper():
    assert (REPO / "LICENSE").read_text().startswith("MIT License")
    citation = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0" and citation["license"] == "MIT"
    assert citation["preferred-citation"]["authors"][0]["family-names"] == "Wortsman"
    assert "Model soups" in citation["preferred-citation"]["title"]


def test_the_wheel_installs_only_the_library_under_its_own_name(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "soups", source / "soups", ignore=shutil.ignore_patterns("__pycache__"))
    for layer in ("cli", "tasks", "flows", "deployments"):  # present, as in a checkout, and left out
        shutil.copytree(REPO / layer, source / layer, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"soups"}, top
    assert "soups/model_configs/" in {n[: n.rindex("/") + 1] for n in names if n.endswith(".json")}
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    assert "License-Expression: MIT" in zipfile.ZipFile(wheel).read(metadata).decode()
    assert not any(n.endswith("entry_points.txt") for n in names), "no command that needs the checkout"


def test_every_distribution_the_code_imports_is_declared_and_the_tested_majors_are_bounded():
    imported: set[str] = set()
    for layer in LAYERS:
        for path in (REPO / layer).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    imported |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    imported.add(node.module.split(".")[0])
    third_party = {name for name in imported - set(sys.stdlib_module_names) - set(LAYERS) if name != "__future__"}
    declared = _requirements()
    missing = {n for n in third_party if DISTRIBUTIONS.get(n, n).lower().replace("_", "-") not in declared}
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"
    for name in ("prefect", "mlflow", "optuna", "open-clip-torch"):
        assert "<" in declared[name], declared[name]


def test_the_lock_pins_every_declared_distribution_and_make_installs_from_it():
    locked = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            locked[name.lower().replace("_", "-")] = version
    for name in [*_requirements(), "optuna-dashboard", "pytest", "ruff"]:
        assert locked.get(name), f"{name} is not pinned in requirements.lock (run `make lock`)"
    assert locked["torch"] == "2.14.1"
    assert "-c requirements.lock" in (REPO / "Makefile").read_text()


def _tool(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("#!/bin/sh\n")
    (folder / name).chmod(0o755)
    return folder / name


def test_postgres_tools_off_the_path_are_found_in_debians_newest_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(processes, "DEBIAN_POSTGRES", tmp_path)
    for version in ("9.6", "15", "16"):
        for name in processes.POSTGRES_TOOLS:
            _tool(tmp_path / version / "bin", name)
    assert tool_path("initdb", "postgres") == str(tmp_path / "16" / "bin" / "initdb")
    require_postgres()


def test_make_test_says_in_one_line_what_is_missing_when_postgres_is_not_installed(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(processes, "DEBIAN_POSTGRES", tmp_path)
    with pytest.raises(StackError, match="initdb"):
        tool_path("initdb", "postgres")
    with pytest.raises(SystemExit) as exit_:
        require_postgres()
    message = str(exit_.value.code)
    assert "\n" not in message and "initdb" in message and "apt-get install postgresql" in message
