"""Failing loudly, leaving no ghosts, taking bad ingredients in stride: real `soups` processes (killed, started
together), real Prefect, MLflow on sqlite and Optuna; no mocks."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from mlflow import MlflowClient
from optuna.trial import TrialState

from cli.main import main
from soups.config import ConfigError, load_config
from tests.helpers import cli_environment

REPO = Path(__file__).resolve().parents[2]
# Trials that learn nothing (and so never diverge), fast or slow by their epochs.
STILL = "space={lr: {kind: loguniform, low: 1.0e-9, high: 2.0e-9}}"


class Marker:
    """Pickled into a checkpoint: a file that only unpickling (never done) could load."""


def _sweep(root: Path, *settings: str) -> list[str]:
    sets = ["--set", f"tracking.root={root}", "--set", "pretrain=null"]
    for setting in settings:
        sets += ["--set", setting]
    return [sys.executable, "-m", "cli.main", "sweep", *sets]


def _client(root: Path) -> MlflowClient:
    uri = f"sqlite:///{(root / 'mlflow.db').resolve()}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _study(root: Path) -> optuna.Study:
    return optuna.load_study(study_name="digits-soups", storage=f"sqlite:///{(root / 'optuna.db').resolve()}")


def _alive_in_group(group: int) -> list[int]:
    """Processes of a process group that still run (zombies are dead, only not yet reaped)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] not in ("Z", "X"):
            alive.append(int(entry.name))
    return alive


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _wait_for_a_training_trial(root: Path, process: subprocess.Popen, log: Path, timeout: float = 150) -> None:
    """Until the study has a RUNNING trial whose MLflow run exists (its id recorded on the trial)."""
    query = (
        "select count(*) from trials t join trial_user_attributes a on a.trial_id = t.trial_id "
        "where t.state = 'RUNNING' and a.key = 'mlflow_run_id'"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the sweep ended early:\n{log.read_text()[-3000:]}"
        try:
            with sqlite3.connect(root / "optuna.db", timeout=1) as db:
                if db.execute(query).fetchone()[0]:
                    return
        except sqlite3.Error:
            pass  # not created yet
        time.sleep(0.3)
    raise AssertionError(f"no trial started training within {timeout}s:\n{log.read_text()[-3000:]}")


# ------------------------------------------------------------------------------------------ fail loudly


def test_a_search_space_outside_the_training_limits_is_a_config_error(tmp_path, capsys):
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"space": {"lr": {"kind": "uniform", "low": -1, "high": -0.5}}})
    message = str(caught.value)
    assert "space.lr: low -1.0 is not a valid train.lr" in message and "greater than 0" in message
    with pytest.raises(ConfigError, match=r"space.randaugment_n: high 9 .*less than or equal to 4"):
        load_config(None, {"space": {"randaugment_n": {"kind": "int", "low": 0, "high": 9}}})
    with pytest.raises(ConfigError, match="space.lr: or_zero's 0 is not a valid train.lr"):
        load_config(None, {"space": {"lr": {"kind": "loguniform", "low": 1e-5, "high": 1e-3, "or_zero": True}}})
    with pytest.raises(ConfigError, match="space.label_smoothing: choice 1.5"):
        load_config(None, {"space": {"label_smoothing": {"kind": "categorical", "choices": [0.1, 1.5]}}})
    with pytest.raises(ConfigError, match="train.epochs is an integer; use kind int"):
        load_config(None, {"space": {"epochs": {"kind": "uniform", "low": 1, "high": 3}}})
    assert load_config().space["lr"].low == 1e-6, "the paper's space fits"
    load_config(None, {"space": {"lr": {"kind": "categorical", "choices": [3e-4, 1e6]}}})  # big, but valid

    bad = "space={lr: {kind: uniform, low: -1, high: -0.5}}"
    assert main(["sweep", "--set", f"tracking.root={tmp_path}", "--set", bad]) == 2
    err = capsys.readouterr().err
    assert "space.lr" in err and "-1.0" in err and "Traceback" not in err


def test_a_sweep_where_no_trial_finishes_fails_with_one_line(tmp_path):
    root = tmp_path / "data"
    diverging = _sweep(
        root, "sweep.n_trials=2", "train.epochs=1", "space={lr: {kind: categorical, choices: [1000000.0]}}"
    )
    done = subprocess.run(
        diverging, cwd=REPO, env=cli_environment(tmp_path / "home"), capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("soups sweep: error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert "NoTrialFinishedError: none of the 2 trials" in errors[0] and "TrainingDivergedError" in errors[0]
    assert "Traceback" not in done.stderr, "Prefect's console keeps tracebacks at debug level"
    assert [t.state for t in _study(root).trials] == [TrialState.FAIL, TrialState.FAIL]
    client = _client(root)
    experiment = client.get_experiment_by_name("digits-soups")
    (sweep_run,) = client.search_runs([experiment.experiment_id], "tags.kind = 'sweep'")
    assert sweep_run.info.status == "FAILED", "the flow run (and its MLflow run) failed"
    assert "none of the 2 trials" in sweep_run.data.tags["failure_reason"]


# ------------------------------------------------------------------------------------------ no ghosts


def _wait_for_a_training_state(root: Path, process: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    """Until a trial's run holds a committed training state of its second epoch (its mark uploaded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the sweep ended early:\n{log.read_text()[-3000:]}"
        if list((root / "artifacts").glob("*/artifacts/training/epoch-0002.json")):
            return
        time.sleep(0.1)
    raise AssertionError(f"no training state of epoch 2 within {timeout}s:\n{log.read_text()[-3000:]}")


def _epochs_logged(output: str, number: int) -> list[int]:
    return [int(epoch) for epoch in re.findall(rf"trial {number}: epoch (\d+)/4 ", output)]


def test_a_killed_sweep_restarted_at_once_leaves_no_ghost_and_its_lost_trial_resumes(tmp_path):
    """SIGKILL mid-trial, then `soups sweep` again at once with the default heartbeat (60 s): the killed sweep's
    trial, runs and flow runs are closed at the restart's start (their process is gone), and the lost trial is
    asked again and trains only the epochs after its last training state."""
    root = tmp_path / "data"
    log = tmp_path / "killed.log"
    settings = ("sweep.n_trials=1", "train.epochs=4", STILL)
    with log.open("w") as out:
        killed = subprocess.Popen(
            _sweep(root, *settings),
            cwd=REPO,
            env=cli_environment(tmp_path / "home"),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_for_a_training_state(root, killed, log)
        assert len(_alive_in_group(killed.pid)) >= 2, "the sweep and its temporary Prefect server"
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        deadline = time.monotonic() + 20
        while _alive_in_group(killed.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive_in_group(killed.pid), "the temporary Prefect server must die with the killed sweep"
    finally:
        _kill_group(killed)
    (mark,) = (root / "artifacts").glob("*/artifacts/training/epoch-*.json")  # older states were replaced
    saved = int(mark.stem.removeprefix("epoch-"))
    checkpoints = root / "checkpoints"
    leftover = checkpoints / ".digits-soups-trial-0.safetensors.4242.tmp"
    leftover.write_bytes(b"half a checkpoint")
    os.utime(leftover, (time.time() - 600, time.time() - 600))
    kept = checkpoints / "someone-elses.safetensors"
    kept.write_bytes(b"a checkpoint")

    done = subprocess.run(  # at once, with the default heartbeat: no waiting for the grace period
        _sweep(root, *settings), cwd=REPO, env=cli_environment(tmp_path / "home"), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]

    ghost, retry, new = _study(root).trials
    assert ghost.state == TrialState.FAIL
    assert re.fullmatch(r"process died: trial 0's process \d+ on .+ is gone", ghost.user_attrs["fail_reason"])
    assert retry.user_attrs["retry_of"] == 0 and retry.params == ghost.params and retry.state == TrialState.COMPLETE
    assert new.state == TrialState.COMPLETE and "retry_of" not in new.user_attrs
    output = done.stdout + done.stderr
    assert _epochs_logged(output, 1) == list(range(saved + 1, 5)), "the retry trains only the epochs left"
    assert _epochs_logged(output, 2) == [1, 2, 3, 4]

    client = _client(root)
    run = client.get_run(ghost.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["failure_reason"] == ghost.user_attrs["fail_reason"]
    resumed = client.get_run(retry.user_attrs["mlflow_run_id"])
    assert resumed.data.tags["resumed_from_run"] == run.info.run_id
    assert run.data.tags["resumed_by_run"] == resumed.info.run_id
    assert resumed.data.tags["resumed_after_epoch"] == str(saved)
    curve = client.get_metric_history(resumed.info.run_id, "heldout_accuracy")
    assert sorted(m.step for m in curve) == [1, 2, 3, 4], "the curve continues the lost run's"
    killed_sweep = client.get_run(ghost.user_attrs["sweep_run_id"])
    assert killed_sweep.info.status == "FAILED"
    assert re.match(r"process died: the sweep's process \d+ on .+ is gone", killed_sweep.data.tags["failure_reason"])
    experiment = client.get_experiment_by_name("digits-soups")
    assert not client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'"), "no ghost runs"
    assert not list((root / "artifacts").glob("*/artifacts/training/*")), "registered: training states deleted"
    assert not leftover.exists() and kept.exists(), "only stale temporaries are removed"

    # Prefect's record (the root's own Prefect database): the killed sweep's flow run and task runs are Crashed.
    with contextlib.closing(sqlite3.connect(root / "prefect" / "prefect.db")) as prefect_db:
        flow_runs = dict(prefect_db.execute("SELECT id, state_type FROM flow_run").fetchall())
        task_runs = [state for (state,) in prefect_db.execute("SELECT state_type FROM task_run").fetchall()]
    assert flow_runs[killed_sweep.data.tags["prefect.flow_run_id"]] == "CRASHED"
    assert "RUNNING" not in set(flow_runs.values()) | set(task_runs), "no ghost flow or task runs"
    seconds = {t.number: t.user_attrs["train_function_seconds"] for t in (retry, new)}
    print(f"resumed after epoch {saved}/4: {seconds[1]:.1f}s in finetune(), against {seconds[2]:.1f}s from scratch")


def test_two_sweeps_on_one_fresh_study_run_forty_trials_four_at_a_time_and_lose_or_repeat_none(tmp_path):
    """Started together on a fresh root (the stores are created under a file lock), each with 4 trials in
    flight on the default SQLite backends: every trial ends once, COMPLETE, registered once."""
    root = tmp_path / "data"
    command = _sweep(root, "sweep.n_trials=20", "sweep.parallel=4", "train.epochs=1", STILL)
    both = [
        subprocess.Popen(
            command,
            cwd=REPO,
            env=cli_environment(tmp_path / "home"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for _ in range(2)
    ]
    try:
        outputs = [process.communicate(timeout=900)[0] for process in both]
    finally:
        for process in both:
            _kill_group(process)
    for process, output in zip(both, outputs, strict=True):
        assert process.returncode == 0, output[-3000:]
        assert "database is locked" not in output and "Traceback" not in output, output[-3000:]
        assert "20 trials finished, 0 failed or pruned" in output
    trials = _study(root).trials
    assert sorted(t.number for t in trials) == list(range(40))
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 40
    versions = _client(root).search_model_versions("name='digits-soups-ingredients'")
    assert sorted(int(v.tags["trial_number"]) for v in versions) == list(range(40))
    assert len({v.run_id for v in versions}) == 40
    experiment = _client(root).get_experiment_by_name("digits-soups")
    assert not _client(root).search_runs([experiment.experiment_id], "attributes.status != 'FINISHED'")


# ------------------------------------------------------------------------------------------ one line


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_an_unreachable_tracking_server_fails_fast_in_one_line(tmp_path, capsys):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    started = time.monotonic()
    settings = [f"tracking.root={tmp_path}", "pretrain=null", f"tracking.mlflow_uri=http://127.0.0.1:{port}"]
    assert main(["sweep", *[x for s in settings for x in ("--set", s)]]) == 1
    assert time.monotonic() - started < 15, "no minutes of retries"
    line = _one_error_line(capsys)
    assert f"the MLflow server at http://127.0.0.1:{port}" in line and "unreachable" in line
    assert "mlflow server" in line and "tracking.mlflow_uri" in line


def test_a_database_driver_that_is_not_installed_is_named_with_what_to_install(tmp_path, capsys):
    drivers = [
        ("postgresql+psycopg2", "psycopg2", "psycopg2-binary"),
        ("postgresql+psycopg", "psycopg", "psycopg[binary]"),
        ("mysql+pymysql", "pymysql", "PyMySQL"),
        ("mssql+pymssql", "pymssql", "pymssql"),
    ]
    missing = [d for d in drivers if importlib.util.find_spec(d[1]) is None]
    assert missing, "one of these drivers is absent from the test environment"
    scheme, module, package = missing[0]
    storage = f"tracking.optuna_storage={scheme}://soups@127.0.0.1/optuna"
    assert main(["sweep", "--set", f"tracking.root={tmp_path}", "--set", "pretrain=null", "--set", storage]) == 1
    line = _one_error_line(capsys)
    assert f"needs the {module} database driver" in line and f"install {package}" in line


def test_a_pickled_pretrained_start_is_refused_without_advice_to_unpickle_it(tmp_path, capsys):
    pickled = tmp_path / "start.pt"
    torch.save({"visual.proj": torch.zeros(2, 2), "extra": Marker()}, pickled)
    settings = [f"tracking.root={tmp_path}", f"model.pretrained={pickled}"]
    assert main(["sweep", *[x for s in settings for x in ("--set", s)]]) == 2
    line = _one_error_line(capsys)
    assert str(pickled) in line and "safetensors" in line
    assert "weights_only=False" not in line and "never unpickled" in line

    from cli.main import _one_line  # the same line for the error raised deep inside a flow

    with pytest.raises(Exception) as caught:
        torch.load(pickled, weights_only=True)
    assert "weights_only" in str(caught.value), "torch's own message, which the line replaces"
    translated = _one_line(caught.value)
    assert "weights_only=False" not in translated and "\n" not in translated and "safetensors" in translated


@pytest.mark.parametrize("revision", ["older", "unknown"])
def test_an_mlflow_database_of_another_version_is_one_line(tmp_path, capsys, revision):
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    script = ScriptDirectory.from_config(_get_alembic_config(""))
    found = next(iter(script.get_bases())) if revision == "older" else "0123456789ab"
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        db.execute("create table alembic_version (version_num varchar(32) not null primary key)")
        db.execute("insert into alembic_version values (?)", (found,))
        db.execute("create table experiments (experiment_id integer primary key, name varchar(256))")
    assert main(["kitchen", "--set", f"tracking.root={tmp_path}", "--set", "pretrain=null"]) == 1
    line = _one_error_line(capsys)
    assert f"the MLflow database at sqlite:///{tmp_path.resolve() / 'mlflow.db'} was made by another MLflow" in line
    assert f"revision {found}" in line and "mlflow db upgrade" in line
    assert ("an older schema" if revision == "older" else "newer MLflow") in line


# ------------------------------------------------------------------------------------------ bad ingredients


def test_the_kitchen_skips_bad_ingredients_naming_each_and_fails_below_two(tmp_path, capsys):
    from soups.checkpoint import file_sha256, save_state_dict
    from tasks.adapters.tracking import client_for, ensure_experiment, ingredients_model_name
    from tasks.gathering import gather_ingredients

    config = load_config(None, {"tracking.root": str(tmp_path / "data"), "pretrain": None})
    experiment_id = ensure_experiment(config)
    client = client_for(config.tracking)

    def register(
        number: int, status: str | None, sha256: str | None = None, reason: str | None = None, weights=None
    ) -> None:
        path = tmp_path / f"trial-{number}.safetensors"
        if isinstance(weights, bytes):
            path.write_bytes(weights)
            checkpoint = path
        else:
            checkpoint = save_state_dict(weights or {"w": torch.full((4,), float(number))}, path)
        run_id = client.create_run(experiment_id, tags={"kind": "ingredient", "study": config.study_name}).info.run_id
        client.log_artifact(run_id, str(checkpoint), "checkpoint")
        tags = {"study": config.study_name, "sha256": sha256 or file_sha256(checkpoint), "checkpoint": checkpoint.name}
        source = f"{client.get_run(run_id).info.artifact_uri}/checkpoint"
        client.create_model_version(ingredients_model_name(config), source=source, run_id=run_id, tags=tags)
        if reason:
            client.set_tag(run_id, "failure_reason", reason)
        if status:
            client.set_terminated(run_id, status)

    register(1, "FINISHED")
    register(2, "FINISHED", sha256="0" * 64)  # the artifact store copy differs from what was registered
    register(3, None)  # killed between registering and finishing its run
    register(4, "FINISHED")
    register(5, "FAILED", reason="process died: trial 5 had no heartbeat for more than 120s")
    register(6, "FINISHED", weights={"w": torch.tensor([1.0, float("nan"), 0.0, 0.0])})  # diverged
    register(7, "FINISHED", weights={"w": torch.zeros(5)})  # another architecture
    register(8, "FINISHED", weights=b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")  # checksummed, unreadable
    register(9, "FINISHED")
    gathered = gather_ingredients.fn(config)
    refs = gathered.refs

    assert [r.version for r in refs] == ["1", "4", "9"]
    out = capsys.readouterr().out
    assert "skipping ingredient version 2: ChecksumMismatchError" in out
    assert "skipping ingredient version 3: its run" in out and "is RUNNING, not FINISHED" in out
    assert "skipping ingredient version 5" in out and "process died: trial 5" in out
    assert "skipping ingredient version 6: NonFiniteTensorError" in out
    assert "skipping ingredient version 7: IncompatibleCheckpointsError" in out and "shape [5]" in out
    assert "skipping ingredient version 8: CheckpointError" in out
    skipped = gathered.skipped  # what the kitchen tags its run with (skipped_ingredients)
    assert sorted(skipped) == ["2", "3", "5", "6", "7", "8"] and "sha256" in skipped["2"]

    two_bad = config.model_copy(
        update={"kitchen": config.kitchen.model_copy(update={"ingredient_versions": [1, 2, 3]})}
    )
    with pytest.raises(ValueError) as caught:
        gather_ingredients.fn(two_bad)
    message = str(caught.value)
    assert "only 1 usable ingredient(s)" in message and "(versions: 1)" in message
    assert "version 2: ChecksumMismatchError" in message and "version 3: its run" in message
