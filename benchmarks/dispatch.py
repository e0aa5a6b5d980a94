"""Orchestration overhead per trial, ``sweep.dispatch: local`` vs ``deployment``, measured in one run on one stack.

Starts ``soups stack up --workers W`` in a temporary folder (timed), then runs the same N-trial sweep against
it twice, once per dispatch, and reads each sweep run's ``orchestration_seconds_per_trial``: the wall time of
a trial as the sweep sees it minus the time inside ``finetune()``. For ``deployment`` that includes queueing,
the worker starting a process, imports, fetching the start and preparing the data; for ``local`` it is the
task machinery. The stack is taken down at the end.

    .venv/bin/python benchmarks/dispatch.py [--trials 4] [--parallel 1] [--workers 1] [--epochs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deployments.stack import sourced_environment

BIN = Path(sys.executable).parent


def _soups(env: dict[str, str], *argv: str) -> str:
    done = subprocess.run([str(BIN / "soups"), *argv], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"soups {' '.join(argv[:2])} failed: {done.stderr.strip().splitlines()[-1:]}")
    return done.stdout


def _sweep(root: Path, env: dict[str, str], start: str, dispatch: str, args: argparse.Namespace) -> dict[str, float]:
    from mlflow import MlflowClient

    space = {
        "lr": {"kind": "loguniform", "low": 3e-4, "high": 1e-3},
        "epochs": {"kind": "int", "low": args.epochs, "high": args.epochs},
    }
    settings = {
        "experiment": f"bench-{dispatch}",
        "model.pretrained": start,
        "sweep.dispatch": dispatch,
        "sweep.n_trials": args.trials,
        "sweep.parallel": args.parallel,
        "train.threads": max(1, (os.cpu_count() or 1) // max(args.parallel, args.workers)),
        "space": json.dumps(space),
    }
    started = time.perf_counter()
    _soups(env, "sweep", str(root / "stack.yaml"), *[a for k, v in settings.items() for a in ("--set", f"{k}={v}")])
    wall = time.perf_counter() - started
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(f"bench-{dispatch}")
    (run,) = client.search_runs([experiment.experiment_id], "tags.kind = 'sweep'")
    return {"overhead": run.data.metrics["orchestration_seconds_per_trial"], "sweep_wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("SOUPS_DB_PASSWORD", "benchmark-only-password")
    folder = Path(tempfile.mkdtemp(prefix="soups-bench-"))
    folder.chmod(0o755)  # PostgreSQL runs as the postgres user when started by root
    root = folder / "stack"
    try:
        started = time.perf_counter()
        _soups(dict(os.environ), "stack", "up", "--root", str(root), "--workers", str(args.workers))
        stack_up = time.perf_counter() - started
        env = sourced_environment(root)
        out = _soups({**env, "PREFECT_API_URL": ""}, "pretrain", "--set", f"tracking.root={folder / 'local'}")
        start = out.strip().splitlines()[-1].removeprefix("pretrained checkpoint: ")
        results = {dispatch: _sweep(root, env, start, dispatch, args) for dispatch in ("local", "deployment")}
    finally:
        subprocess.run([str(BIN / "soups"), "stack", "down", "--root", str(root)], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)
    print(f"soups stack up --workers {args.workers}: {stack_up:.1f}s")
    print(f"{args.trials} trials, parallel {args.parallel}, {args.epochs} epoch(s) each")
    print(f"{'dispatch':<12}{'overhead/trial (s)':>20}{'sweep wall (s)':>16}")
    for dispatch, result in results.items():
        print(f"{dispatch:<12}{result['overhead']:>20.2f}{result['sweep_wall']:>16.1f}")
    extra = results["deployment"]["overhead"] - results["local"]["overhead"]
    print(f"deployment overhead - local overhead: {extra:.2f}s per trial")
    print(
        f"overhead_local={results['local']['overhead']:.2f} overhead_deployment={results['deployment']['overhead']:.2f}"
    )


if __name__ == "__main__":
    main()
