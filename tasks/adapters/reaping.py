"""What sweeps killed mid-way (SIGKILL, OOM, a lost machine) leave behind, closed at the next sweep's start:
Optuna trials without a heartbeat, the MLflow runs of ended trials and sweeps still RUNNING, and half-written
checkpoint temporaries. Nothing a live sweep holds is touched."""

from __future__ import annotations

import time
from pathlib import Path

import optuna

from soups.config import PipelineConfig
from tasks.adapters.studies import fail_stale_trials, grace_seconds
from tasks.adapters.tracking import FLOW_RUN_TAG, fail_run


def reap_ghosts(config: PipelineConfig, study: optuna.Study, client, experiment_id: str) -> dict[str, str]:
    """Close what sweeps killed mid-way (SIGKILL, OOM, a lost machine) left behind, so nothing stays RUNNING:
    trials with no heartbeat for the grace period are told FAIL; the MLflow runs of ended trials still RUNNING
    and sweep runs left RUNNING whose trials all ended become FAILED with a ``failure_reason``; checkpoint
    temporaries older than the grace period are deleted. Live sweeps (heartbeats, recent activity) are left.
    Returns the Prefect flow runs those runs came from (id -> reason): their process is gone too."""
    dead_flow_runs: dict[str, str] = {}
    grace = grace_seconds(config.sweep.heartbeat_seconds)
    reasons = fail_stale_trials(study)
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
        fail_run(client, run.info.run_id, reason)
        print(f"MLflow run {run.info.run_id} of trial {trial.number} marked FAILED: {reason}")
        _note_flow_run(dead_flow_runs, run, reason)
    for trial in trials:
        if "sweep_run_id" in trial.user_attrs:
            trial_runs.setdefault(trial.user_attrs["sweep_run_id"], []).append(trial.number)
    now = time.time()
    for run in running:
        if run.data.tags.get("kind") != "sweep":
            continue
        own = [by_number[n] for n in trial_runs.get(run.info.run_id, [])]
        if any(not t.state.is_finished() for t in own):
            continue
        numbers = ", ".join(str(t.number) for t in own) or "none"
        stale = [t.number for t in own if str(t.user_attrs.get("fail_reason", "")).startswith("process died")]
        ended = [t.datetime_complete.timestamp() for t in own if t.datetime_complete]
        last = max(ended, default=run.info.start_time / 1000)
        if stale:  # its heartbeats stopped: the process that held this run is gone
            reason = f"process died: the sweep's trial {stale[0]} lost its heartbeat; its trials ({numbers}) all ended"
        elif now - last > grace:
            reason = (
                f"process died: the sweep ended without closing its run; its trials ({numbers}) all ended and "
                f"nothing happened for {now - last:.0f}s"
            )
        else:
            continue  # a live sweep between two trials, or just started
        fail_run(client, run.info.run_id, reason)
        print(f"sweep run {run.info.run_id} marked FAILED: {reason}")
        _note_flow_run(dead_flow_runs, run, reason)
    _remove_stale_temporaries(config.tracking.checkpoint_dir(), grace)
    return dead_flow_runs


def _note_flow_run(dead: dict[str, str], run, reason: str) -> None:
    """The Prefect flow run an MLflow run was made in (its ``prefect.flow_run_id`` tag), if any."""
    flow_run_id = run.data.tags.get(FLOW_RUN_TAG)
    if flow_run_id:
        dead.setdefault(flow_run_id, reason)


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
