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
import socket
import subprocess
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from deployments.postgres import (
    create_databases,
    create_optuna_schema,
    database_url,
    init_postgres,
    start_postgres,
    stop_any,
)
from deployments.processes import (
    PASSWORD_VARIABLE,
    Service,
    StackError,
    Started,
    Track,
    answers,
    child_environment,
    free_port,
    http_request,
    is_running,
    launch,
    netloc,
    process_group,
    tool_path,
    wait_ready,
)

CHECKOUT = Path(__file__).resolve().parent.parent
RECORD, OVERLAY, ENV_FILE = "stack.json", "stack.yaml", "stack.env"


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
class Stack:
    root: Path
    services: list[Service]
    mlflow_uri: str
    prefect_api: str
    optuna_storage: str
    generated_password: bool


# --- MLflow and Prefect --------------------------------------------------------------------------------------


def start_mlflow(root: Path, host: str, port: int, database: str, password: str) -> Started:
    """``mlflow server`` on PostgreSQL, serving artifacts from DIR/artifacts (clients upload through it). Its
    GenAI job runner (seven more processes) stays off unless the environment turns it on."""
    argv = [
        tool_path("mlflow", "mlflow"),
        "server",
        "--backend-store-uri",
        database_url(database, "mlflow"),
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
    env = child_environment(PGPASSWORD=password, MLFLOW_SERVER_ENABLE_JOB_EXECUTION=jobs)
    return launch(root, "mlflow", argv, env, f"http://{netloc(host, port)}")


def _prefect_environment(root: Path, api: str, **extra: str) -> dict[str, str]:
    return child_environment(PREFECT_HOME=str(root / "prefect"), PREFECT_API_URL=api, **extra)


def start_prefect_server(root: Path, host: str, port: int, database: str, password: str) -> Started:
    """``prefect server start`` (API, UI and services) on PostgreSQL, its home under DIR."""
    argv = [tool_path("prefect", "prefect-server"), "server", "start", "--host", host, "--port", str(port)]
    api = f"http://{netloc(host, port)}/api"
    url = database_url(database, "prefect", "asyncpg")
    env = _prefect_environment(root, api, PGPASSWORD=password, PREFECT_SERVER_DATABASE_CONNECTION_URL=url)
    return launch(root, "prefect-server", argv, env, api)


def ensure_work_pool(api: str, pool: str) -> None:
    """The process work pool with Prefect's default job template; an existing pool is kept as it is."""
    from prefect.workers.process import ProcessWorker

    body = {"name": pool, "type": "process", "base_job_template": ProcessWorker.get_default_base_job_template()}
    status, _ = http_request(f"{api}/work_pools/", body)
    if status not in (201, 409):
        raise StackError(f"prefect-server: creating work pool {pool!r} answered HTTP {status}")


def worker_name(service: str) -> str:
    """The name a worker registers with in the pool: unique across machines."""
    return f"{socket.gethostname()}-{service}"


def _is_registered(api: str, pool: str, name: str) -> bool:
    """Whether the worker ``name`` has sent the pool its first heartbeat."""
    _, workers = http_request(f"{api}/work_pools/{pool}/workers/filter", {})
    return any(worker["name"] == name for worker in workers or [])


def start_worker(root: Path, api: str, pool: str, service: str, password: str, gpu: str | None) -> Started:
    """``prefect worker start`` taking one flow run at a time (``--limit 1``), on its own GPU when ``gpu`` is
    given (CUDA_VISIBLE_DEVICES), so two trials never share a GPU. Its flow runs inherit PGPASSWORD (Optuna's
    storage) and SOUPS_CHECKOUT (the deployments' working directory)."""
    argv = [tool_path("prefect", service), "worker", "start", "--pool", pool, "--name", worker_name(service)]
    argv += ["--limit", "1"]
    checkout = os.environ.get("SOUPS_CHECKOUT", str(CHECKOUT))
    devices = {"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}
    env = _prefect_environment(root, api, PGPASSWORD=password, SOUPS_CHECKOUT=checkout, **devices)
    where = f" on GPU {gpu}" if gpu is not None else ""
    return launch(root, service, argv, env, f"pool {pool} as {worker_name(service)}{where}")


def visible_gpus() -> list[str]:
    """The GPUs this machine gives its workers: CUDA_VISIBLE_DEVICES when set, else what ``nvidia-smi -L``
    lists (none without a driver)."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [gpu.strip() for gpu in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if gpu.strip()]
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    return [str(index) for index, line in enumerate(listing.stdout.splitlines()) if line.startswith("GPU ")]


def deploy_trial(root: Path, api: str, pool: str) -> None:
    """``prefect deploy`` of the ``trial`` deployment (deployments/prefect.yaml) on ``pool``: what a sweep with
    ``sweep.dispatch: deployment`` starts its trials through."""
    argv = [tool_path("prefect", "prefect-deploy"), "--no-prompt", "deploy", "--name", "trial"]
    argv += ["--pool", pool, "--prefect-file", str(CHECKOUT / "deployments" / "prefect.yaml")]
    log = root / "prefect-deploy.log"
    with log.open("ab") as out:
        done = subprocess.run(argv, cwd=CHECKOUT, env=_prefect_environment(root, api), stdout=out, stderr=out)
    if done.returncode != 0:
        raise StackError(f"prefect-deploy: deploying the trial deployment failed; see {log}")


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


def _exports(root: Path) -> dict[str, str]:
    """The literal ``export NAME=value`` lines of DIR/stack.env (none when it does not exist)."""
    env_file = root / ENV_FILE
    lines = env_file.read_text().splitlines() if env_file.exists() else []
    pairs = (line.removeprefix("export ").split("=", 1) for line in lines if line.startswith("export "))
    values = {name: shlex.split(value)[0] for name, value in pairs}
    return {name: value for name, value in values.items() if not value.startswith("${")}


def _saved_password(root: Path) -> str | None:
    """The password an earlier ``up`` generated into stack.env."""
    return _exports(root).get(PASSWORD_VARIABLE)


def sourced_environment(root: Path) -> dict[str, str]:
    """This process's environment as `. DIR/stack.env` leaves it in a shell: the stack's addresses, and the
    database password as PGPASSWORD (from SOUPS_DB_PASSWORD, or the one ``up`` generated)."""
    env = {**os.environ, **_exports(root)}
    password = os.environ.get(PASSWORD_VARIABLE) or env.get(PASSWORD_VARIABLE)
    return {**env, "PGPASSWORD": password} if password else env


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
    """DIR/stack.yaml, a config for ``soups run``: tracking through the stack's servers (no password), and
    trials as flow runs of the trial deployment on the stack's workers."""
    import yaml

    tracking = {"root": str(root / "data"), "mlflow_uri": stack.mlflow_uri, "optuna_storage": stack.optuna_storage}
    overlay = {"tracking": tracking, "sweep": {"dispatch": "deployment"}}
    header = f"# Written by `soups stack up`; run `. {root / ENV_FILE}` first (the database password).\n"
    (root / OVERLAY).write_text(header + yaml.safe_dump(overlay, sort_keys=False))


# --- the stack -----------------------------------------------------------------------------------------------


def _check(options: StackOptions) -> None:
    try:
        ipaddress.ip_address(options.host)
    except ValueError:
        raise StackError(f"--host must be an IP address of this machine, got {options.host!r}") from None
    if options.workers < 0:
        raise StackError(f"--workers must be 0 or more, got {options.workers}")
    gpus = visible_gpus()
    if gpus and options.workers > len(gpus):
        raise StackError(
            f"--workers {options.workers} is more than this machine's {len(gpus)} GPUs ({','.join(gpus)}): one "
            f"worker per GPU, so two trials never share one; use --workers {len(gpus)} or fewer"
        )
    running = [service.name for service in recorded(options.root.resolve()) if process_group(service)]
    if running:
        raise StackError(
            f"a stack is already running at {options.root} ({', '.join(running)}); "
            f"`soups stack down --root {options.root}` first"
        )


def _start_database(root: Path, options: StackOptions, password: str, track: Track) -> str:
    """PostgreSQL with a database per client; its host:port."""
    init_postgres(root, options.host, password)
    port = free_port(options.host, options.postgres_port, "postgres")
    track(start_postgres(root, options.host, port, options.timeout))
    create_databases(options.host, port, password)
    return netloc(options.host, port)


def _start_servers(root: Path, options: StackOptions, database: str, password: str, track: Track) -> tuple[str, str]:
    """MLflow and Prefect, started together and each given the whole timeout to answer; their URLs."""
    host, timeout = options.host, options.timeout
    mlflow, mlflow_process = start_mlflow(
        root, host, free_port(host, options.mlflow_port, "mlflow"), database, password
    )
    track(mlflow)
    prefect_port = free_port(host, options.prefect_port, "prefect-server")
    prefect, prefect_process = start_prefect_server(root, host, prefect_port, database, password)
    track(prefect)
    create_optuna_schema(database, password)  # meanwhile
    wait_ready(mlflow, mlflow_process, partial(answers, f"{mlflow.address}/health"), "answer /health", timeout)
    wait_ready(prefect, prefect_process, partial(answers, f"{prefect.address}/health"), "answer /api/health", timeout)
    return mlflow.address, prefect.address


def _start_workers(root: Path, options: StackOptions, api: str, password: str, track: Track) -> None:
    """The work pool, the trial deployment and the workers (one per GPU when there are GPUs), started
    together; returns once each worker has registered with the pool."""
    ensure_work_pool(api, options.pool)
    gpus = visible_gpus()
    workers = []
    for index in range(1, options.workers + 1):
        gpu = gpus[index - 1] if gpus else None
        worker, process = start_worker(root, api, options.pool, f"worker-{index}", password, gpu)
        track(worker)
        workers.append((worker, process))
    deploy_trial(root, api, options.pool)  # meanwhile
    for worker, process in workers:
        registered = partial(_is_registered, api, options.pool, worker_name(worker.name))
        wait_ready(worker, process, registered, f"register with work pool {options.pool!r}", options.timeout)


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
            stop_any(root, service)
        (root / RECORD).unlink(missing_ok=True)
        raise
    stack = Stack(root, started, mlflow_uri, api, database_url(database, "optuna"), generated)
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
    alive = [service for service in services if process_group(service)]
    for service in reversed(services):
        stop_any(root, service)
    (root / RECORD).unlink(missing_ok=True)
    return alive
