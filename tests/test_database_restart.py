"""PostgreSQL restarted under a running sweep, on a real stack (`soups stack up --workers 2 --auth`): two trials
are training on the two workers when the stack's cluster gets `pg_ctl restart -m fast`, which drops every
connection of the MLflow server, the Prefect server, the sweep and both trial processes. Each trial in flight
either rides over it or fails with a reason and is asked again; the sweep completes its count; nothing is
registered twice; and both servers recover by themselves (the same processes answer afterwards)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from deployments.postgres import _db_owner
from deployments.processes import is_running, tool_path
from deployments.stack import recorded, sourced_environment, status
from tests.helpers import authenticated_stack

PASSWORD = "database-restart-test-password"
SOUPS = str(Path(sys.executable).with_name("soups"))
EXPERIMENT = "db-restart"
TRIALS = 4
SPACE = json.dumps(
    {"lr": {"kind": "loguniform", "low": 3e-4, "high": 1e-3}, "epochs": {"kind": "int", "low": 3, "high": 3}}
)


@pytest.fixture(scope="module")
def stack():
    with authenticated_stack(PASSWORD) as root:  # it checks that `down` stops the restarted cluster too
        yield root


def _pg_ctl(root: Path, *argv: str) -> None:
    """pg_ctl on the stack's cluster, as the stack runs it (as the `postgres` user when this is root), its
    server's output appended to the stack's postgres.log (without -l it would hold this process's pipe)."""
    data, log = root / "postgres", root / "postgres.log"
    command = [tool_path("pg_ctl", "postgres"), *argv, "-D", str(data), "-l", str(log), "-w", "-t", "60"]
    done = subprocess.run(
        command, capture_output=True, text=True, cwd=data, start_new_session=True, timeout=90, **_db_owner()
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _service(root: Path, name: str):
    return next(service for service in recorded(root) if service.name == name)


def _overrides(pretrained: Path, **settings) -> list[str]:
    values = {
        "experiment": EXPERIMENT,
        "model.pretrained": str(pretrained),
        "train.threads": 1,
        "sweep.sampler": "random",
        "space": SPACE,
        **settings,
    }
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def _two_trials_training(storage_url: str, sweep: subprocess.Popen, timeout: float) -> list[int]:
    """Wait until two trials of the study are RUNNING with their MLflow run started (training); their numbers."""
    deadline = time.monotonic() + timeout
    storage = optuna.storages.RDBStorage(storage_url)  # one pool for the whole wait (disposed before the restart)
    try:
        while time.monotonic() < deadline:
            assert sweep.poll() is None, "the sweep ended before two trials were training"
            try:
                study = optuna.load_study(study_name=EXPERIMENT, storage=storage)
            except KeyError:  # not created yet
                time.sleep(1)
                continue
            running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            training = [t.number for t in running if "mlflow_run_id" in t.user_attrs]
            if len(training) >= 2:
                return training
            time.sleep(0.5)
    finally:
        storage.engine.dispose()
    raise AssertionError(f"two trials were not training at once within {timeout}s")


def test_a_postgres_restart_mid_sweep_completes_the_count_registers_each_once_and_the_servers_recover(
    stack, pretrained_checkpoint
):
    tracking = yaml.safe_load((stack / "stack.yaml").read_text())["tracking"]
    services = [_service(stack, name) for name in ("mlflow", "prefect-server", "worker-1", "worker-2")]
    settings = {
        "sweep.n_trials": TRIALS,
        "sweep.parallel": 2,
        "sweep.heartbeat_seconds": 3,
        "sweep.poll_seconds": 1,
    }
    argv = [SOUPS, "sweep", str(stack / "stack.yaml"), *_overrides(pretrained_checkpoint, **settings)]
    started = time.perf_counter()
    sweep = subprocess.Popen(
        argv, env=sourced_environment(stack), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        in_flight = _two_trials_training(tracking["optuna_storage"], sweep, timeout=300)
        postmaster = (stack / "postgres" / "postmaster.pid").read_text().split()[0]
        restart, restarted_at = time.perf_counter(), datetime.now()
        _pg_ctl(stack, "restart", "-m", "fast")
        print(f"pg_ctl restart -m fast with trials {in_flight} training: {time.perf_counter() - restart:.1f}s")
        assert (stack / "postgres" / "postmaster.pid").read_text().split()[0] != postmaster  # a new server
        output, _ = sweep.communicate(timeout=900)
    finally:
        sweep.kill()
    print(output[-6000:])
    print(f"sweep with a database restart: {time.perf_counter() - started:.1f}s")
    for name in ("worker-1", "worker-2"):  # what the trials' processes said about the restart
        said = [line for line in (stack / f"{name}.log").read_text().splitlines() if "Optuna storage" in line]
        print(f"{name}:", *said[-6:], sep="\n  ")
    assert sweep.returncode == 0, output[-3000:]

    # The study has its count of COMPLETE trials; every failed one says why, and a lost one was asked again.
    study = optuna.load_study(study_name=EXPERIMENT, storage=tracking["optuna_storage"])
    trials = study.get_trials()
    states = {t.number: t.state.name for t in trials}
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(complete) == TRIALS, states
    assert all(t.user_attrs.get("fail_reason") for t in failed), {t.number: t.user_attrs for t in failed}
    assert len(trials) == TRIALS + len(failed), states  # every trial beyond the count retries a failed one
    retried = sorted(t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs)
    assert retried == sorted(t.number for t in failed), (retried, states)
    assert not [t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    by_number = {t.number: t for t in trials}
    assert all(by_number[n].datetime_complete > restarted_at for n in in_flight)  # they were in flight

    # Each COMPLETE trial registered exactly once, from its own run; nothing of a failed trial.
    client = MlflowClient(tracking_uri=tracking["mlflow_uri"])
    versions = client.search_model_versions(f"name='{EXPERIMENT}-ingredients'")
    assert sorted(int(v.tags["trial_number"]) for v in versions) == sorted(t.number for t in complete)
    assert len({v.run_id for v in versions}) == len(versions)
    assert {v.run_id for v in versions} == {t.user_attrs["mlflow_run_id"] for t in complete}

    # Nothing is left RUNNING in MLflow either: the sweep's run and every trial's run ended.
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = client.search_runs([experiment_id], max_results=100)
    assert len(runs) >= TRIALS + 1
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []

    # Both servers answer through the restarted database; they and the workers are the processes started
    # before it.
    assert EXPERIMENT in {e.name for e in client.search_experiments()}
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: services[1].address}), get_client(sync_client=True) as prefect:
        flow_runs = prefect.read_flow_runs(limit=50)
    by_id = {str(run.id): run for run in flow_runs}
    for trial in trials:  # each trial's flow run is there; a COMPLETE trial's flow run completed
        flow_run = by_id[trial.user_attrs["prefect_flow_run_id"]]
        assert flow_run.state.is_final(), (trial.number, flow_run.state)
        if trial.state == optuna.trial.TrialState.COMPLETE:
            assert flow_run.state.is_completed(), (trial.number, flow_run.state)
    assert all(is_running(service) for service in services), services  # same pid and start time: not restarted
    assert all(alive for _, alive in status(stack)), "status sees the restarted cluster running"
