"""PostgreSQL for the stack: initialised once in DIR/postgres with scram passwords, run as the `postgres` user
when started by root (it refuses root), one role owning a database per client."""

from __future__ import annotations

import ipaddress
import os
import subprocess
from contextlib import suppress
from pathlib import Path
from typing import Any

from deployments.processes import (
    PASSWORD_VARIABLE,
    Service,
    StackError,
    is_running,
    netloc,
    recorded_service,
    stop,
    tool_path,
)

ROLE = "soups"
DATABASES = ("mlflow", "optuna", "prefect")

# --- PostgreSQL ----------------------------------------------------------------------------------------------


def _db_owner() -> dict[str, Any]:
    """How to run PostgreSQL's programs: as the `postgres` system user when soups runs as root (initdb, pg_ctl
    and postgres refuse root), else as ourselves."""
    if os.geteuid() != 0:
        return {}
    import pwd

    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        raise StackError("postgres: PostgreSQL refuses to run as root and there is no `postgres` user") from None
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _pg_run(argv: list[str], cwd: Path, stdin: str | None = None, log: Path | None = None) -> None:
    """Run one of PostgreSQL's programs as the database owner; one line saying why if it fails. In a new session
    there is no terminal, so initdb's --pwprompt reads the password from ``stdin``."""
    owner = _db_owner()
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True, cwd=cwd, start_new_session=True, **owner)
    if result.returncode == 0:
        return
    said = [line.strip() for line in (result.stderr + result.stdout).splitlines()]
    errors = [line for line in said if "error" in line or "could not" in line]  # not initdb's prompts
    reason = errors[-1] if errors else f"exit code {result.returncode}"
    if owner and "Permission denied" in reason:
        reason += "; PostgreSQL runs as the `postgres` user here, so DIR and the folders above it must be open to it"
    raise StackError(f"postgres: {Path(argv[0]).name} failed: {reason}" + (f" (see {log})" if log else ""))


def _own(path: Path) -> None:
    owner = _db_owner()
    if owner:
        os.chown(path, owner["user"], owner["group"])


def init_postgres(root: Path, host: str, password: str) -> None:
    """Create the cluster once: superuser ROLE with ``password`` (typed into initdb's prompt through a pipe),
    scram password authentication; off loopback, the host's own subnets may connect too."""
    data = root / "postgres"
    if not (data / "PG_VERSION").exists():
        data.mkdir(mode=0o700, parents=True, exist_ok=True)
        _own(data)
        initdb = [tool_path("initdb", "postgres"), "-D", str(data), "-U", ROLE, "--auth=scram-sha-256", "--pwprompt"]
        _pg_run([*initdb, "--encoding=UTF8", "--locale=C"], data, stdin=f"{password}\n{password}\n")
    rule = f"host all {ROLE} samenet scram-sha-256\n"
    hba = data / "pg_hba.conf"
    if not ipaddress.ip_address(host).is_loopback and rule not in hba.read_text():
        with hba.open("a") as out:
            out.write(rule)


def start_postgres(root: Path, host: str, port: int, timeout: float) -> Service:
    """``pg_ctl start`` on ``host:port`` only (no Unix socket: the folder may be shared), waiting until it
    accepts connections. Room for 400 clients: the MLflow and Prefect servers keep pools, and every trial
    process opens Optuna storages of its own (PostgreSQL's default of 100 runs out with a few workers)."""
    data, log = root / "postgres", root / "postgres.log"
    log.touch()
    _own(log)
    options = f"-p {port} -h {host} -k '' -c max_connections=400"
    pg_ctl = [tool_path("pg_ctl", "postgres"), "start", "-D", str(data), "-l", str(log), "-o", options]
    _pg_run([*pg_ctl, "-w", "-t", str(int(timeout))], data, log=log)
    pid = int((data / "postmaster.pid").read_text().split()[0])
    return recorded_service(root, "postgres", pid, netloc(host, port))


def running_postmaster(root: Path) -> int | None:
    """The cluster's postmaster pid while it runs, from DIR/postgres/postmaster.pid: it changes when someone
    restarts the cluster with ``pg_ctl restart``, so the pid ``up`` recorded is not enough."""
    try:
        pid = int((root / "postgres" / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


def stop_postgres(root: Path, service: Service, grace: float = 20.0) -> None:
    """``pg_ctl stop -m fast`` (clients are disconnected, no recovery needed at the next start) while the
    cluster runs, restarted or not, then make sure of it by the recorded process group."""
    if is_running(service) or running_postmaster(root) is not None:
        data = root / "postgres"
        pg_ctl = [tool_path("pg_ctl", "postgres"), "stop", "-D", str(data), "-m", "fast", "-w", "-t", str(int(grace))]
        with suppress(StackError):
            _pg_run(pg_ctl, data)
    stop(service, grace)


def stop_any(root: Path, service: Service) -> None:
    if service.name == "postgres":
        stop_postgres(root, service)
    else:
        stop(service)


def database_url(netloc: str, name: str, driver: str = "psycopg2") -> str:
    """A SQLAlchemy URL without a password (the driver reads PGPASSWORD). The driver is explicit: SQLAlchemy
    2.1 maps a bare postgresql:// to psycopg 3, which this project does not install."""
    return f"postgresql+{driver}://{ROLE}@{netloc}/{name}"


def create_databases(host: str, port: int, password: str) -> None:
    """One database per client, owned by ROLE (kept when they exist)."""
    import psycopg2

    try:
        connection = psycopg2.connect(host=host, port=port, user=ROLE, password=password, dbname="postgres")
    except psycopg2.OperationalError as err:
        reason = str(err).strip().splitlines()[-1]
        raise StackError(
            f"postgres: cannot connect as {ROLE} ({reason}); is {PASSWORD_VARIABLE} its password?"
        ) from None
    connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT datname FROM pg_database")
            existing = {name for (name,) in cursor.fetchall()}
            for name in DATABASES:
                if name not in existing:
                    cursor.execute(f'CREATE DATABASE "{name}" OWNER "{ROLE}"')
    finally:
        connection.close()


def create_optuna_schema(netloc: str, password: str) -> None:
    """Optuna's tables, made once here: sweeps that open a fresh storage from several machines at once would
    race to create them."""
    import optuna

    optuna.storages.RDBStorage(
        database_url(netloc, "optuna"), engine_kwargs={"connect_args": {"password": password}}
    ).engine.dispose()
