"""What a lost trial leaves and how it is found: training states in a run's artifacts (committed by their mark,
never read half-written), trials whose process is gone failed at once on this host, and `soups reap`. Real
MLflow (sqlite + local artifacts), real Optuna storage, real processes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import torch
from mlflow import MlflowClient
from optuna.trial import TrialState

from soups.config import load_config
from soups.training_state import EpochReport, TrainingState
from tasks.adapters.liveness import is_gone, this_process
from tasks.adapters.reaping import Reaper
from tasks.adapters.studies import fail_stale_trials, open_study
from tasks.adapters.tracking import client_for, ensure_experiment
from tasks.adapters.training_states import FOLDER, delete_states, latest_state, state_uploader
from tests.helpers import cli_environment

REPO = Path(__file__).resolve().parent.parent


def _state(epoch: int) -> TrainingState:
    weight = torch.full((3, 2), float(epoch))
    return TrainingState(
        config='{"train": "the same"}',
        epoch=epoch,
        step=10 * epoch,
        model={"head.weight": weight},
        optimizer={"state": {0: {"step": torch.tensor(10.0 * epoch), "exp_avg": weight * 0.1}}, "param_groups": []},
        schedule={"last_epoch": 10 * epoch},
        generators={"torch": torch.get_rng_state(), "cuda": [], "mixup": {"state": epoch}},
        history=[EpochReport(e, 1.0 / e, 0.5 + e / 100, 1.0) for e in range(1, epoch + 1)],
    )


def _client(tmp_path: Path) -> tuple[MlflowClient, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("states", artifact_location=(tmp_path / "artifacts").as_uri())
    return client, client.create_run(experiment).info.run_id


def _names(client: MlflowClient, run_id: str) -> list[str]:
    return sorted(Path(info.path).name for info in client.list_artifacts(run_id, FOLDER))


def test_a_new_state_replaces_the_older_and_a_torn_or_damaged_upload_is_never_read(tmp_path):
    client, run_id = _client(tmp_path)
    staging = tmp_path / "staging"
    staging.mkdir()
    upload = state_uploader(client, run_id, staging)
    upload(_state(1))
    upload(_state(2))
    assert _names(client, run_id) == ["epoch-0002.json", "epoch-0002.safetensors"], "the older pair is deleted"

    folder = tmp_path / "artifacts" / run_id / "artifacts" / FOLDER
    (folder / "epoch-0003.safetensors").write_bytes(b"half an upload")  # cut off before its mark
    (folder / "epoch-0004.safetensors").write_bytes(b"another file")  # a mark that does not match it
    (folder / "epoch-0004.json").write_text(json.dumps({"epoch": 4, "sha256": "0" * 64}))
    (folder / "epoch-0005.json").write_text("{not json")
    state = latest_state(client, run_id, staging)
    assert state is not None and state.epoch == 2 and state.step == 20
    assert torch.equal(state.model["head.weight"], torch.full((3, 2), 2.0))
    assert torch.equal(state.optimizer["state"][0]["exp_avg"], torch.full((3, 2), 0.2))
    assert [r.epoch for r in state.history] == [1, 2] and state.generators["mixup"] == {"state": 2}
    assert list(staging.iterdir()) == [], "downloads are staged and removed"

    delete_states(client, run_id)
    assert _names(client, run_id) == [] and latest_state(client, run_id, staging) is None


def _gone_process() -> dict[str, str]:
    """The name of a process that ran on this host and has exited."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    started = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    child.kill()
    child.wait()
    return {**this_process(), "pid": str(child.pid), "started": started}


def _zombie_process() -> dict[str, str]:
    """The name of a process that exited and whose parent (this one) has not reaped it yet."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    started = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    child.kill()
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.01)
    _ZOMBIES.append(child)  # reaped when the test session ends
    return {**this_process(), "pid": str(child.pid), "started": started}


_ZOMBIES: list[subprocess.Popen] = []


def test_a_trial_whose_process_is_gone_is_failed_at_once_and_live_or_remote_ones_are_left(tmp_path):
    config = load_config(None, {"tracking.root": str(tmp_path)})  # heartbeat 60 s: nothing is stale by time
    study = open_study(config)
    processes = {
        "gone": _gone_process(),
        "live": this_process(),
        "reused pid": {**this_process(), "started": "1"},  # this pid, another start time: not this process
        "remote": {**_gone_process(), "host": socket.gethostname() + "-elsewhere"},
        "zombie": _zombie_process(),
    }
    trials = {}
    for name, process in processes.items():
        trial = study.ask()
        study._storage.record_heartbeat(trial._trial_id)
        trial.set_user_attr("process", process)
        trials[name] = trial
    assert [is_gone(p) for p in processes.values()] == [True, False, True, False, True]

    failed = fail_stale_trials(study)
    assert sorted(failed) == [trials["gone"].number, trials["reused pid"].number, trials["zombie"].number]
    pid = processes["gone"]["pid"]
    assert failed[trials["gone"].number] == f"process died: trial 0's process {pid} on {socket.gethostname()} is gone"
    states = {name: study._storage.get_trial(t._trial_id).state for name, t in trials.items() if name != "zombie"}
    assert states == {
        "gone": TrialState.FAIL,
        "live": TrialState.RUNNING,
        "reused pid": TrialState.FAIL,
        "remote": TrialState.RUNNING,
    }
    assert fail_stale_trials(study) == {}, "a trial is failed once, by one sweep"


def test_soups_reap_closes_a_ghost_now_and_asks_its_parameters_again(tmp_path):
    root = tmp_path / "data"
    config = load_config(None, {"tracking.root": str(root), "pretrain": None})
    experiment_id = ensure_experiment(config)
    client = client_for(config.tracking)
    study = open_study(config)
    ghost = study.ask({"lr": optuna.distributions.FloatDistribution(1e-6, 1e-4, log=True)})
    tags = {"kind": "ingredient", "study": config.study_name, "trial_number": str(ghost.number)}
    run_id = client.create_run(experiment_id, run_name="trial-0", tags=tags).info.run_id
    for key, value in {"process": _gone_process(), "mlflow_run_id": run_id, "seed": 7}.items():
        ghost.set_user_attr(key, value)

    argv = [sys.executable, "-m", "cli.main", "reap", "--set", f"tracking.root={root}", "--set", "pretrain=null"]
    done = subprocess.run(argv, cwd=REPO, env=cli_environment(tmp_path / "home"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 trials failed (1 asked again for the next sweep), 1 MLflow runs" in done.stdout, done.stdout[-2000:]

    ended, retry = study.get_trials()
    assert ended.state == TrialState.FAIL and ended.user_attrs["fail_reason"].startswith("process died: trial 0's")
    assert client.get_run(run_id).info.status == "FAILED"
    assert retry.state == TrialState.WAITING and retry.system_attrs["fixed_params"] == ended.params
    assert retry.user_attrs == {"retry_of": 0, "seed": 7, "resume_run_id": run_id}


def test_a_running_sweeps_reaper_fails_a_ghost_that_appears_meanwhile_within_its_half_heartbeat(tmp_path):
    config = load_config(None, {"tracking.root": str(tmp_path / "data"), "sweep.heartbeat_seconds": 2})
    experiment_id = ensure_experiment(config)
    client = client_for(config.tracking)
    study = open_study(config)
    own = client.create_run(experiment_id, tags={"kind": "sweep", "study": config.study_name}).info.run_id
    crashed: list[dict[str, str]] = []
    with Reaper(config, study, client, experiment_id, own, crashed.append) as reaper:
        time.sleep(1.5)  # a pass with nothing to reap
        ghost = study.ask()
        tags = {"kind": "ingredient", "study": config.study_name, "prefect.flow_run_id": "f" * 32}
        run_id = client.create_run(experiment_id, tags=tags).info.run_id
        ghost.set_user_attr("mlflow_run_id", run_id)
        ghost.set_user_attr("process", _gone_process())
        deadline = time.monotonic() + 10
        while study._storage.get_trial(ghost._trial_id).state == TrialState.RUNNING:
            assert time.monotonic() < deadline, "the reaper never failed the ghost"
            time.sleep(0.1)
        time.sleep(0.5)
        assert reaper.take() == {ghost.number} and reaper.take() == set()
    assert client.get_run(run_id).info.status == "FAILED"
    assert client.get_run(own).info.status == "RUNNING", "the sweep's own run is never reaped"
    assert {"f" * 32: client.get_run(run_id).data.tags["failure_reason"]} in crashed


def test_a_trial_failed_by_a_database_outage_is_lost_and_one_failed_by_its_own_error_is_not():
    """What `retry_lost` asks again: trials whose process or a database went away (the study's, or the MLflow
    server's, answering 503 while it reconnects), never one whose training raised."""
    from tasks.adapters.reaping import lost

    study = optuna.create_study(direction="maximize")
    reasons = {
        "process died (pid 12 on host a)": True,
        "OperationalError: (psycopg2.OperationalError) connection refused": True,
        "RestException: TEMPORARILY_UNAVAILABLE: (psycopg2.OperationalError) connection refused": True,
        "RestException: INVALID_PARAMETER_VALUE: bad metric": False,
        "RuntimeError: CUDA out of memory": False,
    }
    for reason, expected in reasons.items():
        trial = study.ask()
        trial.set_user_attr("fail_reason", reason)
        study.tell(trial, state=TrialState.FAIL)
        assert lost(study.trials[-1]) is expected, reason
