"""Scale-out on a real stack (`soups stack up --workers 2 --auth`: PostgreSQL, mlflow server, Prefect server, two
process workers on 127.0.0.1): sweeps whose trials are flow runs of the `trial` deployment, the nightly
deployment fired by Prefect's scheduler, and a worker lost mid-trial. Everything is driven through the
commands a user types (`soups`, `prefect deploy`), with the environment `stack.env` gives a shell."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from mlflow import MlflowClient

from deployments.processes import process_group
from deployments.stack import recorded, sourced_environment
from tasks.adapters.tracking import weights_uri
from tests.helpers import authenticated_stack

CHECKOUT = Path(__file__).resolve().parent.parent
PASSWORD = "scale-out-test-password"
SOUPS = str(Path(sys.executable).with_name("soups"))
PREFECT = str(Path(sys.executable).with_name("prefect"))
TINY_SPACE = json.dumps(
    {"lr": {"kind": "loguniform", "low": 3e-4, "high": 1e-3}, "epochs": {"kind": "int", "low": 1, "high": 1}}
)


@pytest.fixture(scope="module")
def stack():
    # the scheduler looks every 5 s
    with authenticated_stack(PASSWORD, PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5") as root:
        yield root


def _tracking(root: Path) -> dict:
    return yaml.safe_load((root / "stack.yaml").read_text())["tracking"]


def _service(root: Path, name: str):
    return next(service for service in recorded(root) if service.name == name)


def _submitted_by(root: Path, worker: str) -> set[str]:
    """Flow run ids the worker took, from its own log: both workers may pick up one scheduled run, and the server
    aborts all but one of them before it runs (Prefect logs the abort)."""
    log = (root / f"{worker}.log").read_text()
    aborted = set(re.findall(r"Aborted submission of flow run '([0-9a-f-]{36})'", log))
    return set(re.findall(r"submitting flow run '([0-9a-f-]{36})'", log)) - aborted


@contextmanager
def _prefect(root: Path) -> Iterator:
    """A Prefect client of the stack's server."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api = _service(root, "prefect-server").address
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        yield client


def _soups(root: Path, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [SOUPS, *argv], env=sourced_environment(root), capture_output=True, text=True, timeout=timeout
    )
    print(done.stdout[-4000:], done.stderr[-4000:])
    return done


def _overrides(pretrained: Path, experiment: str, **settings) -> list[str]:
    values = {
        "experiment": experiment,
        "model.pretrained": str(pretrained),
        "train.threads": 1,
        "sweep.sampler": "random",
        "kitchen.recipes": json.dumps(["best", "uniform", "greedy"]),
        "kitchen.bootstrap": 0,
        "space": TINY_SPACE,
        **settings,
    }
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def test_a_deployment_sweep_runs_every_trial_once_across_both_workers_and_the_kitchen_cooks_through_the_server(
    stack, pretrained_checkpoint
):
    overlay = str(stack / "stack.yaml")
    settings = {"sweep.n_trials": 6, "sweep.parallel": 2, "sweep.heartbeat_seconds": 5}
    done = _soups(stack, "run", overlay, *_overrides(pretrained_checkpoint, "scale-out", **settings))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "orchestration overhead per trial" in done.stdout + done.stderr

    tracking = _tracking(stack)
    study = optuna.load_study(study_name="scale-out", storage=tracking["optuna_storage"])
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == list(range(6))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)

    # Every ingredient registered once, from its own run, with a checksum its artifact matches.
    client = MlflowClient(tracking_uri=tracking["mlflow_uri"])
    versions = client.search_model_versions("name='scale-out-ingredients'")
    assert sorted(int(v.tags["trial_number"]) for v in versions) == list(range(6))
    assert len({v.run_id for v in versions}) == 6
    for version in versions:  # each a pyfunc model (logged model trial-<n>) holding the weights
        uri = weights_uri(version)
        path = mlflow.artifacts.download_artifacts(uri, dst_path=str(stack / "check"), tracking_uri=client.tracking_uri)
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == version.tags["sha256"]
    experiment_id = client.get_experiment_by_name("scale-out").experiment_id
    logged = {model.name for model in client.search_logged_models([experiment_id])}
    assert {f"trial-{n}" for n in range(6)} <= logged

    # The start went through the registry by digest: trials got a models:/ URI, never the local path.
    base = client.search_model_versions("name='scale-out-base'")
    assert [v.tags["sha256"] for v in base] == [hashlib.sha256(pretrained_checkpoint.read_bytes()).hexdigest()]
    assert (stack / "data" / "cache" / base[0].tags["sha256"] / pretrained_checkpoint.name).is_file()

    # Each trial was a flow run of the trial deployment, a child of the sweep's flow run; both workers took some.
    run_ids = [t.user_attrs["prefect_flow_run_id"] for t in trials]
    with _prefect(stack) as client_prefect:
        for flow_run_id in run_ids:
            flow_run = client_prefect.read_flow_run(flow_run_id)
            assert flow_run.state.is_completed() and flow_run.parent_task_run_id is not None
            assert flow_run.parameters["config"]["model"]["pretrained"] == f"models:/scale-out-base/{base[0].version}"
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

        tagged = FlowRunFilter(tags=FlowRunFilterTags(all_=["experiment:scale-out"]))
        names = {run.name for run in client_prefect.read_flow_runs(flow_run_filter=tagged)}
        assert {"pipeline-scale-out", "sweep-scale-out-6", "kitchen-scale-out"} <= names  # the CLI tags its runs
    by_worker = {worker: _submitted_by(stack, worker) & set(run_ids) for worker in ("worker-1", "worker-2")}
    for index, worker in enumerate(("worker-1", "worker-2")):  # one worker per GPU, one flow run at a time each
        environ = Path(f"/proc/{_service(stack, worker).pid}/environ").read_bytes().split(b"\0")
        assert f"CUDA_VISIBLE_DEVICES={index}".encode() in environ
        assert (
            "--limit 1"
            in Path(f"/proc/{_service(stack, worker).pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        )
    assert all(by_worker.values()), by_worker
    assert not by_worker["worker-1"] & by_worker["worker-2"]

    # The kitchen cooked from the registry through the server and promoted a champion.
    champion = client.get_model_version_by_alias("scale-out", "champion")
    assert champion.tags.get("recipe") in {"best", "uniform", "greedy"}


def test_the_nightly_deployment_fires_on_its_schedule_and_the_next_run_continues_the_study(
    stack, pretrained_checkpoint
):
    tracking = _tracking(stack)
    config = {
        "experiment": "nightly-check",
        "model": {"pretrained": str(pretrained_checkpoint)},
        "train": {"threads": 1},
        "sweep": {"n_trials": 2, "sampler": "random"},
        "space": json.loads(TINY_SPACE),
        "kitchen": {"recipes": ["best", "uniform"], "bootstrap": 0},
        "tracking": tracking,
    }
    deploy = [PREFECT, "--no-prompt", "deploy", "--name", "nightly-soups", "--prefect-file", "deployments/prefect.yaml"]
    deploy += ["--interval", "20", "--params", json.dumps({"config": config})]
    done = subprocess.run(
        deploy, cwd=CHECKOUT, env=sourced_environment(stack), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    with _prefect(stack) as client:
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

        deployment = client.read_deployment_by_name("soup-pipeline/nightly-soups")
        only = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        deadline, paused = time.monotonic() + 900, False
        while True:
            runs = sorted(client.read_flow_runs(deployment_filter=only), key=lambda r: r.expected_start_time)
            started = [r for r in runs if r.state and (r.state.is_running() or r.state.is_final())]
            if len(started) >= 2 and not paused:  # stop the schedule once the second run is on its way
                client.pause_deployment(deployment.id)
                paused = True
            if len(started) >= 2 and all(r.state.is_final() for r in started[:2]):
                break
            assert time.monotonic() < deadline, [(r.name, r.state.name if r.state else None) for r in runs]
            time.sleep(3)
        first, second = started[:2]
        for run in (first, second):
            assert run.auto_scheduled and run.state.is_completed(), (run.name, run.state)
        for run in runs:  # anything the scheduler queued before the pause
            if run.id not in (first.id, second.id) and not run.state.is_final():
                client.delete_flow_run(run.id)
    took = _submitted_by(stack, "worker-1") | _submitted_by(stack, "worker-2")
    assert {str(first.id), str(second.id)} <= took

    study = optuna.load_study(study_name="nightly-check", storage=tracking["optuna_storage"])
    assert sorted(t.number for t in study.get_trials()) == [0, 1, 2, 3]  # the second night continued the study
    versions = MlflowClient(tracking_uri=tracking["mlflow_uri"]).search_model_versions(
        "name='nightly-check-ingredients'"
    )
    assert sorted(int(v.tags["trial_number"]) for v in versions) == [0, 1, 2, 3]
    assert len({v.run_id for v in versions}) == 4


def test_a_worker_lost_mid_trial_fails_that_trial_and_its_retry_resumes_on_the_other_worker(
    stack, pretrained_checkpoint
):
    """worker-1 and its flow run SIGKILLed after the trial's first training state: the trial fails at once (its
    process is gone), its retry is taken by worker-2 and trains only the epochs after the lost run's state; the
    sweep completes its count and registers nothing of the lost run."""
    tracking = _tracking(stack)
    space = json.dumps(
        {"lr": {"kind": "loguniform", "low": 3e-4, "high": 1e-3}, "epochs": {"kind": "int", "low": 4, "high": 4}}
    )
    settings = {
        "sweep.n_trials": 3,
        "sweep.parallel": 2,
        "sweep.heartbeat_seconds": 2,
        "sweep.poll_seconds": 1,
        "space": space,
    }
    argv = [SOUPS, "sweep", str(stack / "stack.yaml"), *_overrides(pretrained_checkpoint, "lost-worker", **settings)]
    sweep = subprocess.Popen(
        argv, env=sourced_environment(stack), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        victim = _trial_training_on(stack, "worker-1", tracking, timeout=300)
        _wait_for_a_training_state(tracking, victim.user_attrs["mlflow_run_id"], timeout=300)
        for pid in process_group(_service(stack, "worker-1")):  # the worker and its flow run: a lost machine
            os.kill(pid, signal.SIGKILL)
        output, _ = sweep.communicate(timeout=600)
    finally:
        sweep.kill()
    print(output[-4000:])
    assert sweep.returncode == 0, output[-2000:]

    study = optuna.load_study(study_name="lost-worker", storage=tracking["optuna_storage"])
    trials = {t.number: t for t in study.get_trials()}
    lost = trials[victim.number]
    assert lost.state == optuna.trial.TrialState.FAIL
    assert lost.user_attrs["fail_reason"].startswith("process died")
    retries = [t for t in trials.values() if t.user_attrs.get("retry_of") == victim.number]
    assert len(retries) == 1 and retries[0].params == lost.params
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials.values()) == 3

    client = MlflowClient(tracking_uri=tracking["mlflow_uri"])
    lost_run = client.get_run(lost.user_attrs["mlflow_run_id"])
    assert lost_run.info.status == "FAILED" and lost_run.data.tags["failure_reason"].startswith("process died")
    versions = client.search_model_versions("name='lost-worker-ingredients'")
    assert len(versions) == 3 and lost_run.info.run_id not in {v.run_id for v in versions}
    with _prefect(stack) as prefect_client:
        assert prefect_client.read_flow_run(lost.user_attrs["prefect_flow_run_id"]).state.is_crashed()

    (retry,) = retries
    resumed = client.get_run(retry.user_attrs["mlflow_run_id"])
    assert retry.state == optuna.trial.TrialState.COMPLETE
    assert resumed.data.tags["resumed_from_run"] == lost_run.info.run_id
    saved = int(resumed.data.tags["resumed_after_epoch"])
    assert retry.user_attrs["prefect_flow_run_id"] in _submitted_by(stack, "worker-2")
    logged = re.findall(rf"trial {retry.number}: epoch (\d+)/4 ", (stack / "worker-2.log").read_text())
    assert [int(epoch) for epoch in logged] == list(range(saved + 1, 5)), "only the epochs after the state"
    assert not client.list_artifacts(lost_run.info.run_id, "training"), "registered: the states are deleted"
    assert not client.list_artifacts(resumed.info.run_id, "training")


def _wait_for_a_training_state(tracking: dict, run_id: str, timeout: float) -> None:
    """Until the run's first training state is committed (its mark uploaded)."""
    client = MlflowClient(tracking_uri=tracking["mlflow_uri"])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(info.path.endswith(".json") for info in client.list_artifacts(run_id, "training")):
            return
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} saved no training state within {timeout}s")


def _trial_training_on(root: Path, worker: str, tracking: dict, timeout: float):
    """A trial of study lost-worker that ``worker`` took and that has started training (its MLflow run exists)."""
    deadline = time.monotonic() + timeout
    storage = optuna.storages.RDBStorage(tracking["optuna_storage"])  # one connection pool for the whole wait
    while time.monotonic() < deadline:
        try:
            study = optuna.load_study(study_name="lost-worker", storage=storage)
        except KeyError:  # not created yet
            time.sleep(1)
            continue
        taken = _submitted_by(root, worker)
        for trial in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
            if trial.user_attrs.get("prefect_flow_run_id") in taken and "mlflow_run_id" in trial.user_attrs:
                return trial
        time.sleep(0.5)
    raise AssertionError(f"no trial started training on {worker} within {timeout}s")


def _secrets(root: Path) -> list[str]:
    """The database password and both servers' credentials, each as it would appear alone."""
    sourced = sourced_environment(root)
    prefect_password = sourced["PREFECT_API_AUTH_STRING"].split(":", 1)[1]
    return [PASSWORD, sourced["SOUPS_MLFLOW_ADMIN_PASSWORD"], sourced["MLFLOW_TRACKING_PASSWORD"], prefect_password]


def test_no_password_is_in_a_file_log_mlflow_param_or_tag_or_prefect_parameter(stack):
    """Every stage above ran with the secrets in the environment (and stack.env, 0600) only: grep everything
    the stack stored."""
    secrets_ = _secrets(stack)
    others = [p for p in stack.rglob("*") if p.is_file() and p.name != "stack.env"]
    leaks = [(p, n) for p in others for n, secret in enumerate(secrets_) if secret.encode() in p.read_bytes()]
    assert leaks == []  # the servers' and workers' logs (with every flow run's log), records, artifacts, cache
    client = MlflowClient(tracking_uri=_tracking(stack)["mlflow_uri"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    assert len(runs) > 20
    stored = {r.info.run_id: json.dumps([r.data.params, r.data.tags]) for r in runs}
    assert not [run_id for run_id, text in stored.items() if any(secret in text for secret in secrets_)]
    with _prefect(stack) as prefect_client:
        flow_runs = prefect_client.read_flow_runs(limit=200)
        assert len(flow_runs) > 10
        parameters = {f.name: json.dumps(f.parameters, default=str) for f in flow_runs}
        assert not [name for name, text in parameters.items() if any(secret in text for secret in secrets_)]
