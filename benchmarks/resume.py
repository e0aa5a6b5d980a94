"""What a resumed trial saves against a restart from scratch, in one run of the real CLI.

`soups sweep` (one trial of ``--epochs`` epochs, digits, the offline tiny CLIP) is SIGKILLed once the trial's
training state of epoch ``--killed-after`` is committed in its MLflow run. `soups sweep` again at once: it
fails the lost trial (its process is gone), asks it again and runs one new trial. The retry resumes after the
lost run's state; the new trial, same epochs, trains from scratch in the same process. Both walls are the
study's (start to complete), so the retry's includes downloading and checking the state.

Last line: ``resumed_seconds=<s> scratch_seconds=<s> saved_fraction=<f>``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _sweep(root: Path, epochs: int) -> list[str]:
    settings = {
        "tracking.root": str(root),
        "pretrain": "null",
        "sweep.n_trials": "1",
        "train.epochs": str(epochs),
        "space": "{lr: {kind: loguniform, low: 1.0e-5, high: 1.0e-4}}",
    }
    return [sys.executable, "-m", "cli.main", "sweep", *[a for k, v in settings.items() for a in ("--set", f"{k}={v}")]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--killed-after", type=int, default=9)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="soups-resume-"))
    root = folder / "data"
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "PREFECT_API_URL")}
    env["HOME"] = str(folder / "home")
    mark = f"*/artifacts/training/epoch-{args.killed_after:04d}.json"
    with (folder / "killed.log").open("w") as log:
        killed = subprocess.Popen(
            _sweep(root, args.epochs), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        while not list((root / "artifacts").glob(mark)):
            if killed.poll() is not None:
                raise SystemExit(f"the sweep ended before epoch {args.killed_after}'s state: see {folder}/killed.log")
            time.sleep(0.05)
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
    subprocess.run(_sweep(root, args.epochs), cwd=REPO, env=env, check=True, capture_output=True)

    import optuna

    study = optuna.load_study(study_name="digits-soups", storage=f"sqlite:///{root / 'optuna.db'}")
    walls = {}
    for trial in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        kind = "resumed" if "retry_of" in trial.user_attrs else "scratch"
        walls[kind] = (trial.datetime_complete - trial.datetime_start).total_seconds()
    print(f"{args.epochs} epochs, killed after epoch {args.killed_after}'s state; data under {folder}")
    saved = 1 - walls["resumed"] / walls["scratch"]
    print(f"resumed_seconds={walls['resumed']:.2f} scratch_seconds={walls['scratch']:.2f} saved_fraction={saved:.2f}")


if __name__ == "__main__":
    main()
