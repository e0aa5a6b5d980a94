"""The shared backends of a multi-machine setup, on one machine, started and stopped as one stack.

``up`` starts PostgreSQL (one role, databases for MLflow, Optuna and Prefect), an ``mlflow server`` that stores
artifacts itself (clients upload through it, so workers need no shared disk), a Prefect server on PostgreSQL,
a process work pool and its workers. Every process runs in its own process group and is recorded with its
start time in ``DIR/stack.json``, so ``down`` stops exactly what ``up`` started, never a process that reused
a pid. Data stays in DIR.

The database password is never in a URL, a command line, a log or a config: initdb reads it on stdin, and the
servers, workers and clients get it through ``PGPASSWORD``, which libpq (MLflow, Optuna) and asyncpg (Prefect)
read when a URL has none. ``DIR/stack.env`` (mode 0600) exports it for shells.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shlex
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
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

ROLE = "soups"
DATABASES = ("mlflow", "optuna", "prefect")
PASSWORD_VARIABLE = "SOUPS_DB_PASSWORD"
CHECKOUT = Path(__file__).resolve().parent.parent
RECORD, OVERLAY, ENV_FILE = "stack.json", "stack.yaml", "stack.env"
# urllib would send even 127.0.0.1 through an http_proxy from the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class StackError(RuntimeError):
    """A service that cannot start, be reached or be stopped; one line naming it (and its log)."""


@dataclass(frozen=True)
class StackOptions:
    root: Path
    host: str = "127.0.0.1"
    workers: int = 1
    pool: str = "soups"
    postgres_port: int = 0  # 0: any free port
    mlflow_port: int = 0
    prefect_port: int = 0
    timeout: float = 180.0


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


@dataclass(frozen=True)
class Stack:
    root: Path
    services: list[Service]
    mlflow_uri: str
    prefect_api: str
    optuna_storage: str
    generated_password: bool


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


def _group(service: Service) -> list[int]:
    """Live processes in the service's process group that started no earlier than it: it and its children
    (the group number cannot be reused while any of them lives)."""
    members = []
    for entry in Path("/proc").iterdir():
        fields = _proc_stat(int(entry.name)) if entry.name.isdigit() else None
        if fields and int(fields[2]) == service.pid and int(fields[19]) >= service.started:
            members.append(int(entry.name))
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
        members = _group(service)
        for pid in members:
            with suppress(ProcessLookupError):
                os.kill(pid, sig)
        if not members or _wait_until(lambda: not _group(service), seconds):
            break
    else:
        raise StackError(f"{service.name} (pid {service.pid}) is still running after SIGKILL")
    with suppress(ChildProcessError):  # reap it when this process started it
        os.waitpid(service.pid, os.WNOHANG)


def _environment(**extra: str) -> dict[str, str]:
    """This process's environment without the password variables, plus ``extra``: children get PGPASSWORD
    only where they connect to the database."""
    inherited = {k: v for k, v in os.environ.items() if k not in (PASSWORD_VARIABLE, "PGPASSWORD")}
    return {**inherited, **extra}


def _tool(name: str, service: str) -> str:
    """A command beside this Python (the virtualenv's mlflow and prefect), else on the PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise StackError(f"{service}: `{name}` is not on the PATH; install it (PostgreSQL: its bin folder)")
    return found


def _launch(root: Path, name: str, argv: list[str], env: dict[str, str], address: str) -> Started:
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
    return _service(root, name, process.pid, address), process


def _service(root: Path, name: str, pid: int, address: str) -> Service:
    return Service(name, pid, _start_time(pid) or 0, address, str(root / f"{name}.log"))


# --- network -------------------------------------------------------------------------------------------------


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _port(host: str, wanted: int, service: str) -> int:
    """``wanted`` if it is free on ``host`` (0: any free port); checked just before the service starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do
        try:
            probe.bind((host, wanted))
        except OSError as err:
            raise StackError(
                f"{service}: cannot listen on {_netloc(host, wanted)} ({err.strerror}); "
                f"choose another --{service.split('-')[0]}-port or leave it out for a free one"
            ) from None
        return probe.getsockname()[1]


def _request(url: str, body: dict | None = None) -> tuple[int, Any]:
    """GET (or POST ``body`` as JSON) ``url``; (status, decoded JSON or None), status 0 when unreachable."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
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


def _answers(url: str) -> bool:
    return _request(url)[0] == 200


def _wait_ready(
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
        initdb = [_tool("initdb", "postgres"), "-D", str(data), "-U", ROLE, "--auth=scram-sha-256", "--pwprompt"]
        _pg_run([*initdb, "--encoding=UTF8", "--locale=C"], data, stdin=f"{password}\n{password}\n")
    rule = f"host all {ROLE} samenet scram-sha-256\n"
    hba = data / "pg_hba.conf"
    if not ipaddress.ip_address(host).is_loopback and rule not in hba.read_text():
        with hba.open("a") as out:
            out.write(rule)


def start_postgres(root: Path, host: str, port: int, timeout: float) -> Service:
    """``pg_ctl start`` on ``host:port`` only (no Unix socket: the folder may be shared), waiting until it
    accepts connections."""
    data, log = root / "postgres", root / "postgres.log"
    log.touch()
    _own(log)
    options = f"-p {port} -h {host} -k ''"
    pg_ctl = [_tool("pg_ctl", "postgres"), "start", "-D", str(data), "-l", str(log), "-o", options]
    _pg_run([*pg_ctl, "-w", "-t", str(int(timeout))], data, log=log)
    pid = int((data / "postmaster.pid").read_text().split()[0])
    return _service(root, "postgres", pid, _netloc(host, port))


def stop_postgres(root: Path, service: Service, grace: float = 20.0) -> None:
    """``pg_ctl stop -m fast`` (clients are disconnected, no recovery needed at the next start), then make sure
    of it by the recorded process group."""
    if is_running(service):
        data = root / "postgres"
        pg_ctl = [_tool("pg_ctl", "postgres"), "stop", "-D", str(data), "-m", "fast", "-w", "-t", str(int(grace))]
        with suppress(StackError):
            _pg_run(pg_ctl, data)
    stop(service, grace)


def _stop(root: Path, service: Service) -> None:
    if service.name == "postgres":
        stop_postgres(root, service)
    else:
        stop(service)


def _database_url(netloc: str, name: str, driver: str = "psycopg2") -> str:
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
        _database_url(netloc, "optuna"), engine_kwargs={"connect_args": {"password": password}}
    ).engine.dispose()


# --- MLflow and Prefect --------------------------------------------------------------------------------------


def start_mlflow(root: Path, host: str, port: int, database: str, password: str) -> Started:
    """``mlflow server`` on PostgreSQL, serving artifacts from DIR/artifacts (clients upload through it). Its
    GenAI job runner (seven more processes) stays off unless the environment turns it on."""
    argv = [
        _tool("mlflow", "mlflow"),
        "server",
        "--backend-store-uri",
        _database_url(database, "mlflow"),
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(min(4, os.cpu_count() or 1)),
    ]
    jobs = os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    env = _environment(PGPASSWORD=password, MLFLOW_SERVER_ENABLE_JOB_EXECUTION=jobs)
    return _launch(root, "mlflow", argv, env, f"http://{_netloc(host, port)}")


def _prefect_environment(root: Path, api: str, **extra: str) -> dict[str, str]:
    return _environment(PREFECT_HOME=str(root / "prefect"), PREFECT_API_URL=api, **extra)


def start_prefect_server(root: Path, host: str, port: int, database: str, password: str) -> Started:
    """``prefect server start`` (API, UI and services) on PostgreSQL, its home under DIR."""
    argv = [_tool("prefect", "prefect-server"), "server", "start", "--host", host, "--port", str(port)]
    api = f"http://{_netloc(host, port)}/api"
    url = _database_url(database, "prefect", "asyncpg")
    env = _prefect_environment(root, api, PGPASSWORD=password, PREFECT_SERVER_DATABASE_CONNECTION_URL=url)
    return _launch(root, "prefect-server", argv, env, api)


def ensure_work_pool(api: str, pool: str) -> None:
    """The process work pool with Prefect's default job template; an existing pool is kept as it is."""
    from prefect.workers.process import ProcessWorker

    body = {"name": pool, "type": "process", "base_job_template": ProcessWorker.get_default_base_job_template()}
    status, _ = _request(f"{api}/work_pools/", body)
    if status not in (201, 409):
        raise StackError(f"prefect-server: creating work pool {pool!r} answered HTTP {status}")


def worker_name(service: str) -> str:
    """The name a worker registers with in the pool: unique across machines."""
    return f"{socket.gethostname()}-{service}"


def _is_registered(api: str, pool: str, name: str) -> bool:
    """Whether the worker ``name`` has sent the pool its first heartbeat."""
    _, workers = _request(f"{api}/work_pools/{pool}/workers/filter", {})
    return any(worker["name"] == name for worker in workers or [])


def start_worker(root: Path, api: str, pool: str, service: str, password: str) -> Started:
    """``prefect worker start``: its flow runs inherit PGPASSWORD (Optuna's storage) and SOUPS_CHECKOUT (the
    deployments' working directory)."""
    argv = [_tool("prefect", service), "worker", "start", "--pool", pool, "--name", worker_name(service)]
    checkout = os.environ.get("SOUPS_CHECKOUT", str(CHECKOUT))
    env = _prefect_environment(root, api, PGPASSWORD=password, SOUPS_CHECKOUT=checkout)
    return _launch(root, service, argv, env, f"pool {pool} as {worker_name(service)}")


# --- files in DIR --------------------------------------------------------------------------------------------


def recorded(root: Path) -> list[Service]:
    """The services DIR/stack.json lists (none when it does not exist)."""
    record = root / RECORD
    if not record.exists():
        return []
    return [Service(**entry) for entry in json.loads(record.read_text())["services"]]


def _record(root: Path, services: list[Service]) -> None:
    """What ``status`` and ``down`` need: each process with its start time, address and log."""
    record = {"root": str(root), "services": [asdict(service) for service in services]}
    (root / RECORD).write_text(json.dumps(record, indent=2) + "\n")


def _saved_password(root: Path) -> str | None:
    """The password an earlier ``up`` generated into stack.env."""
    env_file = root / ENV_FILE
    prefix = f"export {PASSWORD_VARIABLE}="
    lines = env_file.read_text().splitlines() if env_file.exists() else []
    saved = [shlex.split(line.removeprefix(prefix))[0] for line in lines if line.startswith(prefix)]
    return saved[0] if saved else None


def database_password(root: Path) -> tuple[str, bool]:
    """SOUPS_DB_PASSWORD, else the one generated earlier, else a new one for a new cluster; and whether it was
    generated (then stack.env must keep it)."""
    if os.environ.get(PASSWORD_VARIABLE):
        return os.environ[PASSWORD_VARIABLE], False
    saved = _saved_password(root)
    if saved:
        return saved, True
    if (root / "postgres" / "PG_VERSION").exists():
        raise StackError(
            f"postgres: {root / 'postgres'} exists with a password not in {root / ENV_FILE}; "
            f"set {PASSWORD_VARIABLE} to it"
        )
    return secrets.token_urlsafe(24), True


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to a file only its owner can read, from the first byte on."""
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
        out.write(text)
    partial.replace(path)


def write_env(root: Path, generated_password: str | None, exports: dict[str, str] | None = None) -> None:
    """DIR/stack.env for ``source``: PGPASSWORD from SOUPS_DB_PASSWORD, which it exports only when ``up``
    generated it, and ``exports``."""
    lines = [f"# soups stack at {root}: `. {root / ENV_FILE}` in every shell that uses it. Keep it private."]
    if generated_password:
        lines.append(f"export {PASSWORD_VARIABLE}={shlex.quote(generated_password)}")
    lines.append(f'export PGPASSWORD="${{{PASSWORD_VARIABLE}:?set it to the stack database password}}"')
    lines += [f"export {name}={shlex.quote(value)}" for name, value in (exports or {}).items()]
    _write_private(root / ENV_FILE, "\n".join(lines) + "\n")


def write_overlay(root: Path, stack: Stack) -> None:
    """DIR/stack.yaml, a config for ``soups run``: tracking through the stack's servers (no password)."""
    import yaml

    tracking = {"root": str(root / "data"), "mlflow_uri": stack.mlflow_uri, "optuna_storage": stack.optuna_storage}
    header = f"# Written by `soups stack up`; run `. {root / ENV_FILE}` first (the database password).\n"
    (root / OVERLAY).write_text(header + yaml.safe_dump({"tracking": tracking}, sort_keys=False))


# --- the stack -----------------------------------------------------------------------------------------------


def _check(options: StackOptions) -> None:
    try:
        ipaddress.ip_address(options.host)
    except ValueError:
        raise StackError(f"--host must be an IP address of this machine, got {options.host!r}") from None
    if options.workers < 0:
        raise StackError(f"--workers must be 0 or more, got {options.workers}")
    running = [service.name for service in recorded(options.root.resolve()) if _group(service)]
    if running:
        raise StackError(
            f"a stack is already running at {options.root} ({', '.join(running)}); "
            f"`soups stack down --root {options.root}` first"
        )


def _start_database(root: Path, options: StackOptions, password: str, track: Track) -> str:
    """PostgreSQL with a database per client; its host:port."""
    init_postgres(root, options.host, password)
    port = _port(options.host, options.postgres_port, "postgres")
    track(start_postgres(root, options.host, port, options.timeout))
    create_databases(options.host, port, password)
    return _netloc(options.host, port)


def _start_servers(root: Path, options: StackOptions, database: str, password: str, track: Track) -> tuple[str, str]:
    """MLflow and Prefect, started together and each given the whole timeout to answer; their URLs."""
    host, timeout = options.host, options.timeout
    mlflow, mlflow_process = start_mlflow(root, host, _port(host, options.mlflow_port, "mlflow"), database, password)
    track(mlflow)
    prefect_port = _port(host, options.prefect_port, "prefect-server")
    prefect, prefect_process = start_prefect_server(root, host, prefect_port, database, password)
    track(prefect)
    create_optuna_schema(database, password)  # meanwhile
    _wait_ready(mlflow, mlflow_process, partial(_answers, f"{mlflow.address}/health"), "answer /health", timeout)
    _wait_ready(prefect, prefect_process, partial(_answers, f"{prefect.address}/health"), "answer /api/health", timeout)
    return mlflow.address, prefect.address


def _start_workers(root: Path, options: StackOptions, api: str, password: str, track: Track) -> None:
    """The work pool and its workers, started together; returns once each has registered with the pool."""
    ensure_work_pool(api, options.pool)
    workers = []
    for index in range(1, options.workers + 1):
        worker, process = start_worker(root, api, options.pool, f"worker-{index}", password)
        track(worker)
        workers.append((worker, process))
    for worker, process in workers:
        registered = partial(_is_registered, api, options.pool, worker_name(worker.name))
        _wait_ready(worker, process, registered, f"register with work pool {options.pool!r}", options.timeout)


def up(options: StackOptions) -> Stack:
    """Start every service and wait until each answers; on any failure (or Ctrl-C) stop what was started."""
    _check(options)
    root = options.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    password, generated = database_password(root)
    if generated:  # kept before initdb uses it, so a failed first `up` cannot lose it
        write_env(root, password)
    started: list[Service] = []

    def track(service: Service) -> None:
        started.append(service)
        _record(root, started)  # after every start, so an interrupted `up` can still be taken down

    try:
        database = _start_database(root, options, password, track)
        mlflow_uri, api = _start_servers(root, options, database, password, track)
        _start_workers(root, options, api, password, track)
    except BaseException:
        for service in reversed(started):
            _stop(root, service)
        (root / RECORD).unlink(missing_ok=True)
        raise
    stack = Stack(root, started, mlflow_uri, api, _database_url(database, "optuna"), generated)
    write_overlay(root, stack)
    checkout = os.environ.get("SOUPS_CHECKOUT", str(CHECKOUT))
    exports = {"PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": mlflow_uri, "SOUPS_CHECKOUT": checkout}
    write_env(root, password if generated else None, exports)
    return stack


def status(root: Path) -> list[tuple[Service, bool]]:
    return [(service, is_running(service)) for service in recorded(root.resolve())]


def down(root: Path) -> list[Service]:
    """Stop what stack.json lists, workers first, PostgreSQL last, and remove stack.json; the data stays.
    Returns the services that were still running."""
    root = root.resolve()
    services = recorded(root)
    alive = [service for service in services if _group(service)]
    for service in reversed(services):
        _stop(root, service)
    (root / RECORD).unlink(missing_ok=True)
    return alive
