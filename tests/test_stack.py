"""`soups stack`: real PostgreSQL, mlflow server, Prefect server and a worker on 127.0.0.1, with authentication
on, started and stopped by these tests (the module fixture takes the stack down even when a test fails)."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from cli.main import main
from deployments.processes import http_request
from deployments.stack import (
    ENV_FILE,
    PASSWORD_VARIABLE,
    StackOptions,
    database_password,
    down,
    is_running,
    recorded,
    sourced_environment,
    wants_auth,
)
from tests.helpers import CLIENT_VARIABLES, authenticated_stack, stack_folder

PLANTED = f"planted-secret-{secrets.token_hex(8)}"
SOUPS = str(Path(sys.executable).with_name("soups"))


def _soups_stack(*argv: str) -> int:
    """``soups stack ...`` through the real command line (errors are one line on stderr, exit code 2)."""
    return main(["stack", *argv])


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain ``text`` (each server names its folder in its arguments)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text in cmdline and state != "Z" and entry.name != str(os.getpid()):
            found.append(cmdline)
    return found


def _get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status


@pytest.fixture(scope="module")
def stack():
    """A stack with ``--auth``: the database password planted, MLflow's and Prefect's generated into stack.env;
    this process is then a client of it like a sourced shell (MLflow's and Prefect's credential variables)."""
    with authenticated_stack(PLANTED, workers=1) as root:
        yield root


def _service(root: Path, name: str):
    return next(service for service in recorded(root) if service.name == name)


def test_every_service_answers(stack, monkeypatch):
    import optuna
    import psycopg2
    from mlflow import MlflowClient

    from soups.config import load_config

    config = load_config(stack / "stack.yaml")
    tracking = config.tracking
    assert tracking.root == stack / "data"

    # PostgreSQL takes the password from libpq's environment variable (the URLs carry none) and only it.
    monkeypatch.setenv("PGPASSWORD", PLANTED)
    port = int(_service(stack, "postgres").address.rsplit(":", 1)[1])
    psycopg2.connect(host="127.0.0.1", port=port, user="soups", dbname="optuna").close()
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(host="127.0.0.1", port=port, user="soups", dbname="optuna", password="wrong")
    study = optuna.create_study(study_name="stack-check", storage=tracking.optuna_storage)
    assert study.study_name == "stack-check"

    # MLflow: artifacts go through the server into DIR/artifacts, not to a path the client writes itself.
    assert _get(f"{tracking.mlflow_uri}/health") == 200
    client = MlflowClient(tracking_uri=tracking.mlflow_uri)
    run = client.create_run(client.create_experiment("stack-check"))
    client.log_text(run.info.run_id, "served", "note.txt")
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert [path.read_text() for path in (stack / "artifacts").rglob("note.txt")] == ["served"]

    # Prefect: the server, the process work pool and a live worker registered with it.
    api = _service(stack, "prefect-server").address
    assert _get(f"{api}/health") == 200
    status, pool = http_request(f"{api}/work_pools/soups", auth=os.environ["PREFECT_API_AUTH_STRING"])
    assert status == 200 and pool["type"] == "process"
    worker = _service(stack, "worker-1")
    assert is_running(worker)


def test_files_and_status(stack, capsys):
    env_file = stack / ENV_FILE
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    sourced = subprocess.run(
        ["bash", "-c", f'. {env_file} && printf %s "$PGPASSWORD $PREFECT_API_URL"'],
        capture_output=True,
        text=True,
        env={**os.environ, PASSWORD_VARIABLE: PLANTED},
        check=True,
    ).stdout
    assert sourced == f"{PLANTED} {_service(stack, 'prefect-server').address}"
    assert PLANTED not in (stack / "stack.yaml").read_text() + (stack / "stack.json").read_text()

    capsys.readouterr()
    assert _soups_stack("status", "--root", str(stack)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(" running " in line for line in lines), lines

    assert _soups_stack("up", "--root", str(stack)) == 2
    assert "already running" in capsys.readouterr().err


def _secrets(root: Path) -> list[str]:
    """Every password and auth string of the stack, each as it would appear alone in a file or command line."""
    sourced = sourced_environment(root)
    prefect_password = sourced["PREFECT_API_AUTH_STRING"].split(":", 1)[1]
    return [PLANTED, sourced["SOUPS_MLFLOW_ADMIN_PASSWORD"], sourced["MLFLOW_TRACKING_PASSWORD"], prefect_password]


def test_each_server_refuses_a_request_without_the_credentials_of_stack_env(stack):
    sourced = sourced_environment(stack)
    mlflow = f"{_service(stack, 'mlflow').address}/api/2.0/mlflow/experiments/search?max_results=1"
    flow_runs = f"{_service(stack, 'prefect-server').address}/flow_runs/filter"
    mlflow_user = f"{sourced['MLFLOW_TRACKING_USERNAME']}:{sourced['MLFLOW_TRACKING_PASSWORD']}"
    assert http_request(mlflow)[0] == 401
    assert http_request(mlflow, auth=f"{sourced['MLFLOW_TRACKING_USERNAME']}:wrong")[0] == 401
    assert http_request(mlflow, auth=mlflow_user)[0] == 200
    assert http_request(flow_runs, {"limit": 1})[0] == 401
    assert http_request(flow_runs, {"limit": 1}, "soups:wrong")[0] == 401
    assert http_request(flow_runs, {"limit": 1}, sourced["PREFECT_API_AUTH_STRING"])[0] == 200


@pytest.mark.parametrize(
    ("variable", "named"),
    [
        ("MLFLOW_TRACKING_PASSWORD", "refused the credentials in MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD"),
        ("PREFECT_API_AUTH_STRING", "refused PREFECT_API_AUTH_STRING"),
    ],
)
def test_a_client_with_a_wrong_password_gets_one_line_and_writes_nothing(stack, variable, named):
    files_before = sorted(path for path in stack.rglob("*") if path.is_file() and "postgres" not in path.parts)
    env = {**sourced_environment(stack), variable: "soups:wrong-password"}
    argv = [SOUPS, "run", str(stack / "stack.yaml"), "--set", "experiment=auth-check"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1 and "error:" in lines[0], done.stderr
    assert named in lines[0] and "(401)" in lines[0] and "stack.env" in lines[0], lines[0]
    assert "Traceback" not in done.stderr + done.stdout and "wrong-password" not in done.stderr
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=_service(stack, "mlflow").address)  # as soups, from the environment
    assert client.get_experiment_by_name("auth-check") is None
    files = sorted(path for path in stack.rglob("*") if path.is_file() and "postgres" not in path.parts)
    assert [path for path in files if path not in files_before and not path.name.endswith(".log")] == []


def test_the_credentials_are_in_stack_env_only(stack):
    env_file = stack / ENV_FILE
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    script = f'. {env_file} && printf "%s\\n"' + "".join(f' "${variable}"' for variable in CLIENT_VARIABLES)
    unset = {name: value for name, value in os.environ.items() if name not in CLIENT_VARIABLES}
    shell = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=unset, check=True)
    sourced = sourced_environment(stack)
    assert shell.stdout.splitlines() == [sourced[variable] for variable in CLIENT_VARIABLES]
    assert sourced["MLFLOW_TRACKING_USERNAME"] == "soups" and sourced["PREFECT_API_AUTH_STRING"].startswith("soups:")

    secrets_ = _secrets(stack)
    assert all(len(secret) >= 16 for secret in secrets_)
    others = [path for path in stack.rglob("*") if path.is_file() and path != env_file]
    assert any(path.name == "basic_auth.ini" for path in others) and any(path.suffix == ".log" for path in others)
    leaks = [(path, s) for path in others for s in secrets_ if s.encode() in path.read_bytes()]
    assert leaks == []
    for service in recorded(stack):
        cmdline = Path(f"/proc/{service.pid}/cmdline").read_bytes().decode()
        assert "basic-auth" in cmdline or service.name != "mlflow"
        assert not any(secret in cmdline for secret in secrets_), service.name


def _non_loopback_address() -> str | None:
    """An IPv4 address of this machine on a network (a UDP socket's source address; nothing is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_up_off_loopback_turns_authentication_on_without_auth(tmp_path, monkeypatch, capsys):
    """`up --host <LAN address>` without --auth takes the authenticated path: it reads the Prefect auth string
    (and refuses a malformed one, in one line) before any process starts."""
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to listen on")
    assert wants_auth(StackOptions(tmp_path, host=address)) and not wants_auth(StackOptions(tmp_path))
    monkeypatch.setenv("SOUPS_PREFECT_AUTH_STRING", "no-user-in-it")
    assert _soups_stack("up", "--root", str(tmp_path / "stack"), "--host", address, "--workers", "0") == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "SOUPS_PREFECT_AUTH_STRING must be user:password" in error, error
    assert "no-user-in-it" not in error and not (tmp_path / "stack" / "postgres").exists()


def test_down_stops_every_process_and_keeps_the_data(stack, capsys):
    services = recorded(stack)
    assert _soups_stack("down", "--root", str(stack)) == 0
    assert not any(is_running(service) for service in services)
    assert _processes_mentioning(str(stack)) == []
    for service in services[:3]:
        port = int(service.address.split(":")[-1].split("/")[0])
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", port))
    assert not (stack / "stack.json").exists()
    assert (stack / "postgres" / "PG_VERSION").exists() and any((stack / "artifacts").rglob("note.txt"))

    capsys.readouterr()
    assert _soups_stack("down", "--root", str(stack)) == 0
    assert "nothing to stop" in capsys.readouterr().out

    # The passwords went to the services through their environment only: no log, record or config has one.
    others = [path for path in stack.rglob("*") if path.is_file() and path.name != ENV_FILE]
    assert [path for path in others for secret in _secrets(stack) if secret.encode() in path.read_bytes()] == []


@pytest.fixture
def root_and_taken_port(monkeypatch):
    """A new stack folder, no SOUPS_DB_PASSWORD, and a socket listening on a port `up` is then told to use;
    whatever `up` left running is taken down afterwards."""
    monkeypatch.delenv(PASSWORD_VARIABLE, raising=False)
    root = stack_folder() / "stack"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        try:
            yield root, taken
        finally:
            down(root)
            shutil.rmtree(root.parent)


@pytest.mark.parametrize("failure", ["port taken", "server exits"])
def test_up_that_fails_names_the_service_and_leaves_nothing_running(failure, root_and_taken_port, monkeypatch, capsys):
    """PostgreSQL and MLflow are running when the Prefect server fails: both are stopped again."""
    root, taken = root_and_taken_port
    port = taken.getsockname()[1]
    if failure == "server exits":
        monkeypatch.setenv("PREFECT_SERVER_API_KEEPALIVE_TIMEOUT", "not-a-number")
        taken.close()
    assert _soups_stack("up", "--root", str(root), "--workers", "0", "--prefect-port", str(port)) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "prefect-server" in error, error
    expected = f"cannot listen on 127.0.0.1:{port}" if failure == "port taken" else "prefect-server.log"
    assert expected in error, error
    assert _processes_mentioning(str(root)) == []
    assert not (root / "stack.json").exists()
    # The generated password is kept for the next `up` of this database, and only in stack.env.
    assert stat.S_IMODE((root / ENV_FILE).stat().st_mode) == 0o600
    password, generated = database_password(root)
    assert generated and password in (root / ENV_FILE).read_text()


def test_a_wrong_password_is_refused_and_the_generated_one_kept(root_and_taken_port, monkeypatch, capsys):
    root, taken = root_and_taken_port
    port = str(taken.getsockname()[1])
    assert _soups_stack("up", "--root", str(root), "--workers", "0", "--postgres-port", port) == 2
    assert f"postgres: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    generated = (root / ENV_FILE).read_text()  # initdb ran: its generated password is kept

    monkeypatch.setenv(PASSWORD_VARIABLE, "not-the-password")
    assert _soups_stack("up", "--root", str(root), "--workers", "0") == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("soups stack: error: postgres: cannot connect as soups") and "\n" not in error
    assert "password authentication failed" in error and "not-the-password" not in error
    assert (root / ENV_FILE).read_text() == generated
    assert _processes_mentioning(str(root)) == []
