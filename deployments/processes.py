"""Processes of the stack: each started in its own session and process group, recorded with its start time so
it is never confused with a later process that reused its pid, stopped by group; and the small HTTP checks that
tell a server is up."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PASSWORD_VARIABLE = "SOUPS_DB_PASSWORD"
SECRET_VARIABLES = (
    PASSWORD_VARIABLE,
    "PGPASSWORD",
    "SOUPS_MLFLOW_ADMIN_PASSWORD",
    "SOUPS_MLFLOW_PASSWORD",
    "SOUPS_PREFECT_AUTH_STRING",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
    "MLFLOW_TRACKING_PASSWORD",
    "PREFECT_SERVER_API_AUTH_STRING",
    "PREFECT_API_AUTH_STRING",
)
"""The stack's own secrets and the variables the servers and clients read them from: children get each one
only where they need it."""

# urllib would send even 127.0.0.1 through an http_proxy from the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class StackError(RuntimeError):
    """A service that cannot start, be reached or be stopped; one line naming it (and its log)."""


@dataclass(frozen=True)
class Service:
    """One started process. Its pid is also its process group (it leads its own session); ``started`` (clock
    ticks after boot) tells it from a later process that got the same pid."""

    name: str
    pid: int
    started: int
    address: str
    log: str


Started = tuple[Service, subprocess.Popen]
Track = Callable[[Service], None]


# --- processes -----------------------------------------------------------------------------------------------


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name; None when there is no such live process (zombies
    count as gone: their parent may never reap them)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else fields


def _start_time(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else None


def is_running(service: Service) -> bool:
    return _start_time(service.pid) == service.started


def process_group(service: Service) -> list[int]:
    """Live processes in the service's process group that started no earlier than it, and their descendants
    in sessions of their own (a worker's flow runs): it and everything it started (the group number cannot be
    reused while any of them lives)."""
    live = {}
    for entry in Path("/proc").iterdir():
        fields = _proc_stat(int(entry.name)) if entry.name.isdigit() else None
        if fields and int(fields[19]) >= service.started:
            live[int(entry.name)] = (int(fields[1]), int(fields[2]))  # parent, group
    members = [pid for pid, (_, group) in live.items() if group == service.pid]
    for pid in members:  # grows while it runs: children of members are members
        members += [child for child, (parent, _) in live.items() if parent == pid and child not in members]
    return members


def _wait_until(done: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def stop(service: Service, grace: float = 20.0) -> None:
    """SIGTERM to the service's process group, SIGKILL to whatever is left after ``grace`` seconds."""
    for sig, seconds in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        members = process_group(service)
        for pid in members:
            with suppress(ProcessLookupError):
                os.kill(pid, sig)
        if not members or _wait_until(lambda: not process_group(service), seconds):
            break
    else:
        raise StackError(f"{service.name} (pid {service.pid}) is still running after SIGKILL")
    with suppress(ChildProcessError):  # reap it when this process started it
        os.waitpid(service.pid, os.WNOHANG)


def child_environment(**extra: str) -> dict[str, str]:
    """This process's environment without the secret variables, plus ``extra``: children get PGPASSWORD
    only where they connect to the database, and credentials only where they talk to a server."""
    inherited = {k: v for k, v in os.environ.items() if k not in SECRET_VARIABLES}
    return {**inherited, **extra}


POSTGRES_TOOLS = ("initdb", "pg_ctl", "postgres")
DEBIAN_POSTGRES = Path("/usr/lib/postgresql")


def tool_path(name: str, service: str) -> str:
    """A command beside this Python (the virtualenv's mlflow and prefect), else on the PATH, else (PostgreSQL's)
    in Debian's versioned /usr/lib/postgresql/N/bin, the newest first."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found and name in POSTGRES_TOOLS:
        newest = max(DEBIAN_POSTGRES.glob(f"*/bin/{name}"), key=lambda p: _version(p.parts[-3]), default=None)
        found = str(newest) if newest else None
    if not found:
        raise StackError(
            f"{service}: `{name}` is not on the PATH nor in /usr/lib/postgresql/N/bin; install it "
            "(PostgreSQL: e.g. `apt-get install postgresql`, or put its bin folder on the PATH)"
        )
    return found


def _version(folder: str) -> tuple[int, ...]:
    return tuple(int(part) for part in folder.split(".") if part.isdigit())


def require_postgres() -> None:
    """`make test`'s check: the stack tests need PostgreSQL's own tools; one line and exit 1 when missing."""
    try:
        for name in POSTGRES_TOOLS:
            tool_path(name, "make test (the stack tests run real PostgreSQL clusters)")
    except StackError as err:
        raise SystemExit(str(err)) from None


def launch(root: Path, name: str, argv: list[str], env: dict[str, str], address: str) -> Started:
    """Start a long-running service in its own session, output appended to DIR/<name>.log."""
    log = root / f"{name}.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=root,
            start_new_session=True,
        )
    return recorded_service(root, name, process.pid, address), process


def recorded_service(root: Path, name: str, pid: int, address: str) -> Service:
    return Service(name, pid, _start_time(pid) or 0, address, str(root / f"{name}.log"))


# --- network -------------------------------------------------------------------------------------------------


def netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def free_port(host: str, wanted: int, service: str) -> int:
    """``wanted`` if it is free on ``host`` (0: any free port); checked just before the service starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do
        try:
            probe.bind((host, wanted))
        except OSError as err:
            raise StackError(
                f"{service}: cannot listen on {netloc(host, wanted)} ({err.strerror}); "
                f"choose another --{service.split('-')[0]}-port or leave it out for a free one"
            ) from None
        return probe.getsockname()[1]


def basic_auth(credentials: str) -> dict[str, str]:
    """The Authorization header for ``user:password`` (none for an empty string: auth is off)."""
    token = base64.b64encode(credentials.encode()).decode()
    return {"Authorization": f"Basic {token}"} if credentials else {}


def http_request(url: str, body: dict | None = None, auth: str = "", method: str | None = None) -> tuple[int, Any]:
    """GET (or POST ``body`` as JSON, or ``method``) ``url`` as ``auth`` (``user:password``, "" for none);
    (status, decoded JSON or None), status 0 when unreachable."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json", **basic_auth(auth)}
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with _DIRECT.open(request, timeout=5) as response:
            payload = response.read()
            status = response.status
    except urllib.error.HTTPError as err:
        return err.code, None
    except OSError:
        return 0, None
    with suppress(ValueError):
        return status, json.loads(payload)
    return status, None


def answers(url: str, auth: str = "") -> bool:
    return http_request(url, auth=auth)[0] == 200


def wait_ready(
    service: Service, process: subprocess.Popen, ready: Callable[[], bool], what: str, timeout: float
) -> None:
    """Poll ``ready`` until it holds; a clear error naming the service and its log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            raise StackError(f"{service.name} exited (code {process.returncode}) while starting; see {service.log}")
        if time.monotonic() > deadline:
            raise StackError(f"{service.name} did not {what} within {timeout:.0f}s; see {service.log}")
        time.sleep(0.5)
