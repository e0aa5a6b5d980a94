"""What sweeps killed mid-way (SIGKILL, OOM, a lost machine) leave behind, closed when a sweep starts, every
half heartbeat while one runs (`Reaper`) and on demand (`soups reap`): Optuna trials whose process is gone or
whose heartbeat stopped, the MLflow runs of ended trials and sweeps still RUNNING, and half-written checkpoint
temporaries. Nothing a live sweep holds is touched. A lost trial is asked again once (`retry_lost`) and the
retry resumes from the lost run's last training state (tasks/trial.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from soups.config import PipelineConfig
from tasks.adapters.liveness import KEYS, described, is_gone, this_process
from tasks.adapters.studies import fail_stale_trials, grace_seconds
from tasks.adapters.tracking import FLOW_RUN_TAG, fail_run
from tasks.adapters.training_states import delete_states

PROCESS_TAG = "process."
"""A sweep run's tags ``process.host``, ``process.pid``, ...: the process that holds it (see liveness.py)."""


def process_tags() -> dict[str, str]:
    return {PROCESS_TAG + key: value for key, value in this_process().items()}


@dataclass
class Reaped:
    trials: dict[int, str] = field(default_factory=dict)
    """Trials failed here, number -> reason (all of them lost with their process)."""
    runs: dict[str, str] = field(default_factory=dict)
    """MLflow runs marked FAILED here, run id -> reason."""
    flow_runs: dict[str, str] = field(default_factory=dict)
    """Prefect flow runs whose process is gone (id -> reason), for `crash_flow_runs`."""


def reap_ghosts(
    config: PipelineConfig, study: optuna.Study, client, experiment_id: str, own_run_id: str | None = None
) -> Reaped:
    """Close what sweeps killed mid-way (SIGKILL, OOM, a lost machine) left behind, so nothing stays RUNNING:
    trials whose process is gone (this host) or with no heartbeat for the grace period are told FAIL; the MLflow
    runs of ended trials still RUNNING, and sweep runs left RUNNING whose trials all ended and whose process is
    gone or silent, become FAILED with a ``failure_reason``; checkpoint temporaries older than the grace period
    are deleted. Live sweeps (their process, heartbeats, recent activity) and ``own_run_id`` are left."""
    reaped = Reaped()
    grace = grace_seconds(config.sweep.heartbeat_seconds)
    reasons = reaped.trials = fail_stale_trials(study)
    for number, reason in sorted(reasons.items()):
        print(f"trial {number} failed: {reason}")
    trials = study.get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    by_run = {t.user_attrs["mlflow_run_id"]: t for t in trials if "mlflow_run_id" in t.user_attrs}
    running = [
        r
        for r in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=50_000)
        if r.data.tags.get("study") == config.study_name
    ]
    trial_runs: dict[str, list[int]] = {}  # sweep run id -> its trials' numbers
    for run in running:
        if run.data.tags.get("kind") != "ingredient":
            continue
        number = run.data.tags.get("trial_number")
        trial = by_run.get(run.info.run_id) or (by_number.get(int(number)) if number and number.isdigit() else None)
        if trial is None or not trial.state.is_finished():
            continue
        reason = reasons.get(trial.number) or (
            f"process died: trial {trial.number} ended {trial.state.name} in the study while this run was RUNNING"
        )
        _close(reaped, client, run, reason)
        print(f"MLflow run {run.info.run_id} of trial {trial.number} marked FAILED: {reason}")
    for trial in trials:
        if "sweep_run_id" in trial.user_attrs:
            trial_runs.setdefault(trial.user_attrs["sweep_run_id"], []).append(trial.number)
    now = time.time()
    for run in running:
        if run.data.tags.get("kind") != "sweep" or run.info.run_id == own_run_id:
            continue
        own = [by_number[n] for n in trial_runs.get(run.info.run_id, [])]
        if any(not t.state.is_finished() for t in own):
            continue
        numbers = ", ".join(str(t.number) for t in own) or "none"
        stale = [t.number for t in own if str(t.user_attrs.get("fail_reason", "")).startswith("process died")]
        ended = [t.datetime_complete.timestamp() for t in own if t.datetime_complete]
        last = max(ended, default=run.info.start_time / 1000)
        process = {key: run.data.tags.get(PROCESS_TAG + key, "") for key in KEYS}
        if is_gone(process):
            reason = f"process died: the sweep's {described(process)} is gone; its trials ({numbers}) all ended"
        elif stale:  # its trials' processes died: the process that held this run is gone
            reason = f"process died: the sweep's trial {stale[0]} lost its process; its trials ({numbers}) all ended"
        elif now - last > grace:
            reason = (
                f"process died: the sweep ended without closing its run; its trials ({numbers}) all ended and "
                f"nothing happened for {now - last:.0f}s"
            )
        else:
            continue  # a live sweep between two trials, or just started
        _close(reaped, client, run, reason)
        print(f"sweep run {run.info.run_id} marked FAILED: {reason}")
    _remove_stale_temporaries(config.tracking.checkpoint_dir(), grace)
    return reaped


LOST = ("process died", "StorageInternalError:", "OperationalError:", "RestException: TEMPORARILY_UNAVAILABLE:")
"""How the reason of a trial lost with its process, with the study's database (down for longer than its storage
waits), or with the tracking server's database (MLflow answers 503 TEMPORARILY_UNAVAILABLE while it reconnects),
begins."""


def lost(trial: FrozenTrial) -> bool:
    """Failed because its process, machine or database went away, not because of what it computed."""
    reason = str(trial.user_attrs.get("fail_reason", ""))
    return trial.state == TrialState.FAIL and (reason.startswith(LOST) or "flow run ended Crashed" in reason)


def retry_lost(study: optuna.Study, client, numbers: set[int]) -> list[int]:
    """Ask again, once, each lost trial among ``numbers`` that has no retry yet: same parameters and seed, and
    the lost run to resume from. A lost retry is not asked again, and its states and its lost run's are deleted
    (nobody will resume them). Returns the numbers retried."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
    asked: list[int] = []
    for trial in sorted((t for t in trials if t.number in numbers and lost(t)), key=lambda t: t.number):
        run_id = trial.user_attrs.get("mlflow_run_id")
        if trial.number in retried:
            continue
        if "retry_of" in trial.user_attrs:
            for states_of in (run_id, trial.user_attrs.get("resume_run_id")):
                if states_of:
                    delete_states(client, states_of)
            continue
        retry = {"retry_of": trial.number, "seed": trial.user_attrs["seed"]}
        study.enqueue_trial(trial.params, user_attrs=retry | ({"resume_run_id": run_id} if run_id else {}))
        asked.append(trial.number)
        print(f"trial {trial.number} was lost with its process: asking its parameters again, to resume its run")
    return asked


class Reaper:
    """`reap_ghosts` every half heartbeat in a daemon thread while a sweep runs, so no ghost outlives twice the
    heartbeat while any sweep of the study runs. The sweep takes the trials it failed (`take`) to retry them."""

    def __init__(
        self,
        config: PipelineConfig,
        study: optuna.Study,
        client,
        experiment_id: str,
        own_run_id: str,
        crash: Callable[[dict[str, str]], None],
    ) -> None:
        self._args = (config, study, client, experiment_id, own_run_id)
        self._crash = crash
        self._every = max(1.0, config.sweep.heartbeat_seconds / 2)
        self._failed: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._reap, name="ghost-reaper", daemon=True)

    def __enter__(self) -> Reaper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def take(self) -> set[int]:
        with self._lock:
            failed, self._failed = self._failed, set()
        return failed

    def _reap(self) -> None:
        while not self._stop.wait(self._every):
            try:
                reaped = reap_ghosts(*self._args)
                self._crash(reaped.flow_runs)
            except Exception as err:  # noqa: BLE001 - a store briefly away (a restart): the next round retries
                print(f"reaping ghosts failed, retrying in {self._every:.0f}s: {type(err).__name__}: {err}")
                continue
            with self._lock:
                self._failed |= set(reaped.trials)


def _close(reaped: Reaped, client, run, reason: str) -> None:
    """Mark a dead process's run FAILED; the Prefect flow run it was made in (its ``prefect.flow_run_id`` tag),
    if any, is dead too."""
    fail_run(client, run.info.run_id, reason)
    reaped.runs[run.info.run_id] = reason
    flow_run_id = run.data.tags.get(FLOW_RUN_TAG)
    if flow_run_id:
        reaped.flow_runs.setdefault(flow_run_id, reason)


def _remove_stale_temporaries(folder: Path, grace: float) -> None:
    """``save_state_dict`` writes ``.<name>.<pid>.tmp`` and renames it; one older than the grace period was
    left by a process that died mid-write."""
    if not folder.is_dir():
        return
    for path in folder.glob(".*.tmp"):
        try:
            if time.time() - path.stat().st_mtime > grace:
                path.unlink()
                print(f"removed {path}, left by a process that died while writing it")
        except FileNotFoundError:
            continue
