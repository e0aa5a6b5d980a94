"""mergekit, the peer the merge recipes are checked against: its configs for our recipes, and how to run it.

mergekit lives in its own virtualenv (``bash benchmarks/mergekit_venv.sh``, default ``build/mergekit-venv``,
``SOUPS_MERGEKIT_VENV`` overrides), run as ``mergekit-pytorch CONFIG.yml OUT`` on raw safetensors files. Each
config below is the mergekit equivalent of one recipe with the same parameters: every ``weight`` 1, TIES with
``normalize: true``, SLERP with the first ingredient as mergekit's base model.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
PEER_METHODS = ("task_arithmetic", "ties", "model_stock", "slerp")
"""Recipes whose mergekit equivalent must give the same tensors (DARE's draws differ: timed only)."""

RUN_MERGEKIT = r"""
import sys
from mergekit.scripts.merge_raw_pytorch import main
args = sys.argv[1:]
for index, (config, out) in enumerate(zip(args[::2], args[1::2])):
    threads = ["--num-threads", "1"] if index == 0 else []  # torch takes the interop setting once per process
    main.main([config, out, *threads], standalone_mode=False)
"""
"""Runs several mergekit-pytorch merges in one process (its imports take seconds); argv: CONFIG OUT pairs."""


def mergekit_python() -> Path | None:
    """The mergekit venv's interpreter, or None when the venv has not been built."""
    venv = Path(os.environ.get("SOUPS_MERGEKIT_VENV", ROOT / "build" / "mergekit-venv"))
    return venv / "bin" / "python" if (venv / ".installed").is_file() else None


def mergekit_config(recipe: str, paths: list[Path], base: Path, options: dict[str, Any]) -> dict[str, Any]:
    """The mergekit-pytorch config that computes ``recipe`` with ``options`` (our option names)."""
    if recipe == "slerp":
        first, second = paths
        return {"merge_method": "slerp", "base_model": str(first), "models": [{"model": str(second)}],
                "parameters": {"t": options.get("t", 0.5)}}
    if recipe == "model_stock":
        return {"merge_method": "model_stock", "base_model": str(base), "models": [{"model": str(p)} for p in paths]}
    per_model: dict[str, Any] = {"weight": 1.0}
    shared: dict[str, Any] = {"lambda": options["lambda"]}
    method = recipe
    if recipe == "ties":
        per_model["density"], shared["normalize"] = options["density"], True
    elif recipe == "dare":
        method = f"dare_{options['combine']}"
        per_model["density"] = 1 - options["p"]
    return {"merge_method": method, "base_model": str(base), "parameters": shared,
            "models": [{"model": str(p), "parameters": per_model} for p in paths]}


def write_config(config: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def run_mergekit(python: Path, jobs: list[tuple[Path, Path]]) -> list[Path]:
    """Run each (config file, output folder) merge; returns the merged safetensors files."""
    args = [str(part) for job in jobs for part in job]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([str(python), "-c", RUN_MERGEKIT, *args], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"mergekit failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return [out / "model.safetensors" for _, out in jobs]
