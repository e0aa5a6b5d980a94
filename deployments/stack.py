"""The shared backends of a multi-machine setup, on one machine, started and stopped as one stack.

``up`` starts PostgreSQL (one role, databases for MLflow, Optuna and Prefect), an ``mlflow server`` that stores
artifacts itself (clients upload through it, so workers need no shared disk), a Prefect server on PostgreSQL,
a process work pool and its workers. Every process runs in its own process group and is recorded with its
start time in ``DIR/stack.json``, so ``down`` stops exactly what ``up`` started, never a process that reused
a pid. Data stays in DIR.

The database password is never in a URL, a command line, a log or a config: initdb reads it on stdin, and the
servers, workers and clients get it through ``PGPASSWORD``, which libpq (MLflow, Optuna) and asyncpg (Prefect)
read when a URL has none. ``DIR/stack.env`` (mode 0600) exports it for shells.

With ``--auth`` (always when ``--host`` is not a loopback address) MLflow runs its basic-auth app (users
``admin`` and ``soups``, its user database in DIR/mlflow-auth) and the Prefect server takes a basic-auth
string. The passwords come from SOUPS_MLFLOW_ADMIN_PASSWORD, SOUPS_MLFLOW_PASSWORD and
SOUPS_PREFECT_AUTH_STRING, else are generated into stack.env, and reach the servers, workers and clients only
through the variables MLflow and Prefect read (MLFLOW_TRACKING_PASSWORD, PREFECT_API_AUTH_STRING, ...).
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
from dataclasses import asdict, dataclass
from functools import partial
from importlib.metadata import entry_points
from pathlib import Path

from deployments.postgres import (
    create_databases,
    create_optuna_schema,
    database_url,
    init_postgres,
    running_postmaster,
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
MLFLOW_ADMIN, MLFLOW_USER = "admin", "soups"
ADMIN_PASSWORD, MLFLOW_PASSWORD, PREFECT_AUTH = (
    "SOUPS_MLFLOW_ADMIN_PASSWORD",
    "SOUPS_MLFLOW_PASSWORD",
    "SOUPS_PREFECT_AUTH_STRING",
)
CLIENT_VARIABLES = {
    PASSWORD_VARIABLE: ("PGPASSWORD", "the stack database password"),
    MLFLOW_PASSWORD: ("MLFLOW_TRACKING_PASSWORD", f"the MLflow password of user {MLFLOW_USER}"),
    PREFECT_AUTH: ("PREFECT_API_AUTH_STRING", "the Prefect server user:password"),
}
"""What stack.env exports each secret to for clients (MLflow's, Prefect's and libpq's own variables)."""
AUTH_FOLDER = "mlflow-auth"


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
    auth: bool = False  # implied off loopback: see wants_auth


@dataclass(frozen=True)
class Auth:
    """The credentials of a stack with authentication on."""

    admin_password: str
    mlflow_password: str
    prefect: str  # user:password, as Prefect takes it

    @property
    def mlflow_admin(self) -> str:
        return f"{MLFLOW_ADMIN}:{self.admin_password}"

    def client_environment(self) -> dict[str, str]:
        """What a worker (and its flow runs) needs to talk to both servers."""
        mlflow = {"MLFLOW_TRACKING_USERNAME": MLFLOW_USER, "MLFLOW_TRACKING_PASSWORD": self.mlflow_password}
        return {**mlflow, "PREFECT_API_AUTH_STRING": self.prefect}


@dataclass(frozen=True)
class Stack:
    root: Path
    services: list[Service]
    mlflow_uri: str
    prefect_api: str
    optuna_storage: str
    generated_password: bool
    auth: bool


# --- MLflow and Prefect --------------------------------------------------------------------------------------


def write_auth_config(root: Path) -> Path:
    """DIR/mlflow-auth/basic_auth.ini, without a password (the admin's comes through MLFLOW_AUTH_ADMIN_PASSWORD,
    read only when the user database is new). ``default_permission = MANAGE``: the only users are the stack's
    admin and ``soups``, and ``soups`` must be able to write to experiments and models it did not create (an
    earlier store, or ones made in the UI); a user added later gets MANAGE too unless given grants."""
    folder = root / AUTH_FOLDER
    folder.mkdir(exist_ok=True)
    config = folder / "basic_auth.ini"
    lines = ["[mlflow]", "default_permission = MANAGE", f"database_uri = sqlite:///{folder / 'basic_auth.db'}"]
    lines += [
        f"admin_username = {MLFLOW_ADMIN}",
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
    ]
    config.write_text("\n".join(lines) + "\n")
    return config


def start_mlflow(root: Path, host: str, port: int, database: str, password: str, auth: Auth | None) -> Started:
    """``mlflow server`` on PostgreSQL, serving artifacts from DIR/artifacts (clients upload through it), with
    its basic-auth app when ``auth`` is given. Its GenAI job runner (seven more processes) stays off unless the
    environment turns it on."""
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
    secured = {}
    if auth:
        argv += ["--app-name", "basic-auth"]
        secured = {"MLFLOW_AUTH_CONFIG_PATH": str(write_auth_config(root))}
        secured["MLFLOW_AUTH_ADMIN_PASSWORD"] = auth.admin_password
        secured["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets.token_urlsafe(32)  # CSRF tokens of the UI's forms
    env = child_environment(PGPASSWORD=password, MLFLOW_SERVER_ENABLE_JOB_EXECUTION=jobs, **secured)
    return launch(root, "mlflow", argv, env, f"http://{netloc(host, port)}")


def ensure_mlflow_user(root: Path, mlflow: str, auth: Auth) -> None:
    """The ``soups`` user with the password of this ``up`` (created, or its password updated), as the admin."""
    users = f"{mlflow}/api/2.0/mlflow/users"
    body = {"username": MLFLOW_USER, "password": auth.mlflow_password}
    status, _ = http_request(f"{users}/create", body, auth.mlflow_admin)
    if status != 200:
        status, _ = http_request(f"{users}/update-password", body, auth.mlflow_admin, "PATCH")
    if status == 401:
        raise StackError(
            f"mlflow: the admin of the user database in {root / AUTH_FOLDER} refused the password in "
            f"{ADMIN_PASSWORD}; set it to the one that database was created with"
        )
    if status != 200:
        raise StackError(f"mlflow: setting the password of user {MLFLOW_USER!r} answered HTTP {status}")


def _prefect_environment(root: Path, api: str, auth: Auth | None, **extra: str) -> dict[str, str]:
    """A Prefect client's environment: its home under DIR, the stack's API, and both servers' credentials."""
    credentials = auth.client_environment() if auth else {}
    return child_environment(PREFECT_HOME=str(root / "prefect"), PREFECT_API_URL=api, **credentials, **extra)


def start_prefect_server(root: Path, host: str, port: int, database: str, password: str, auth: Auth | None) -> Started:
    """``prefect server start`` (API, UI and services) on PostgreSQL, its home under DIR; with ``auth``, every
    API call but the health check needs its user:password."""
    argv = [tool_path("prefect", "prefect-server"), "server", "start", "--host", host, "--port", str(port)]
    api = f"http://{netloc(host, port)}/api"
    url = database_url(database, "prefect", "asyncpg")
    secured = {"PREFECT_SERVER_API_AUTH_STRING": auth.prefect} if auth else {}
    env = _prefect_environment(
        root, api, auth, PGPASSWORD=password, PREFECT_SERVER_DATABASE_CONNECTION_URL=url, **secured
    )
    return launch(root, "prefect-server", argv, env, api)


def ensure_work_pool(api: str, pool: str, auth: str) -> None:
    """The process work pool with Prefect's default job template; an existing pool is kept as it is."""
    from prefect.workers.process import ProcessWorker

    body = {"name": pool, "type": "process", "base_job_template": ProcessWorker.get_default_base_job_template()}
    status, _ = http_request(f"{api}/work_pools/", body, auth)
    if status not in (201, 409):
        raise StackError(f"prefect-server: creating work pool {pool!r} answered HTTP {status}")


def worker_name(service: str) -> str:
    """The name a worker registers with in the pool: unique across machines."""
    return f"{socket.gethostname()}-{service}"


def _is_registered(api: str, pool: str, name: str, auth: str) -> bool:
    """Whether the worker ``name`` has sent the pool its first heartbeat."""
    _, workers = http_request(f"{api}/work_pools/{pool}/workers/filter", {}, auth)
    return any(worker["name"] == name for worker in workers or [])


WORKER_SETTINGS = {"PREFECT_WORKER_QUERY_SECONDS": "1"}
"""A worker asks for scheduled flow runs every second (Prefect's default, 10 s, was most of a deployed trial's
overhead): one small query a second per worker."""


def start_worker(
    root: Path, api: str, pool: str, service: str, password: str, gpu: str | None, auth: Auth | None
) -> Started:
    """``prefect worker start`` taking one flow run at a time (``--limit 1``), on its own GPU when ``gpu`` is
    given (CUDA_VISIBLE_DEVICES), so two trials never share a GPU. Its flow runs inherit PGPASSWORD (Optuna's
    storage), SOUPS_CHECKOUT (the deployments' working directory) and the servers' credentials."""
    argv = [tool_path("prefect", service), "worker", "start", "--pool", pool, "--name", worker_name(service)]
    argv += ["--limit", "1"]
    checkout = os.environ.get("SOUPS_CHECKOUT", str(CHECKOUT))
    devices = {"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}
    env = _prefect_environment(
        root, api, auth, PGPASSWORD=password, SOUPS_CHECKOUT=checkout, **devices, **WORKER_SETTINGS
    )
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


def deploy_trial(root: Path, api: str, pool: str, auth: Auth | None) -> None:
    """``prefect deploy`` of the ``trial`` deployment (deployments/prefect.yaml) on ``pool``: what a sweep with
    ``sweep.dispatch: deployment`` starts its trials through."""
    argv = [tool_path("prefect", "prefect-deploy"), "--no-prompt", "deploy", "--name", "trial"]
    argv += ["--pool", pool, "--prefect-file", str(CHECKOUT / "deployments" / "prefect.yaml")]
    log = root / "prefect-deploy.log"
    with log.open("ab") as out:
        done = subprocess.run(argv, cwd=CHECKOUT, env=_prefect_environment(root, api, auth), stdout=out, stderr=out)
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


def _references(root: Path) -> dict[str, str]:
    """The client variables DIR/stack.env sets from a secret one, each with that secret's name
    (``export PGPASSWORD="${SOUPS_DB_PASSWORD:?...}"``)."""
    env_file = root / ENV_FILE
    text = env_file.read_text() if env_file.exists() else ""
    return dict(re.findall(r'^export (\w+)="\$\{(\w+):\?', text, re.MULTILINE))


def _saved(root: Path, variable: str) -> str | None:
    """The secret an earlier ``up`` generated into stack.env."""
    return _exports(root).get(variable)


def sourced_environment(root: Path) -> dict[str, str]:
    """This process's environment as `. DIR/stack.env` leaves it in a shell: the stack's addresses, the
    database password as PGPASSWORD and, with auth on, the credentials of both servers (each from its SOUPS_*
    variable, or the one ``up`` generated)."""
    env = {**os.environ, **_exports(root)}
    for client, variable in _references(root).items():
        value = os.environ.get(variable) or env.get(variable)
        if value:
            env[client] = value
    return env


def database_password(root: Path) -> tuple[str, bool]:
    """SOUPS_DB_PASSWORD, else the one generated earlier, else a new one for a new cluster; and whether it was
    generated (then stack.env must keep it)."""
    if os.environ.get(PASSWORD_VARIABLE):
        return os.environ[PASSWORD_VARIABLE], False
    saved = _saved(root, PASSWORD_VARIABLE)
    if saved:
        return saved, True
    if (root / "postgres" / "PG_VERSION").exists():
        raise StackError(
            f"postgres: {root / 'postgres'} exists with a password not in {root / ENV_FILE}; "
            f"set {PASSWORD_VARIABLE} to it"
        )
    return secrets.token_urlsafe(24), True


def stack_auth(root: Path) -> tuple[Auth, dict[str, str]]:
    """The credentials from SOUPS_MLFLOW_ADMIN_PASSWORD, SOUPS_MLFLOW_PASSWORD and SOUPS_PREFECT_AUTH_STRING, else
    those generated earlier, else new ones; and the generated ones (stack.env must keep them)."""
    fresh = {ADMIN_PASSWORD: "", MLFLOW_PASSWORD: "", PREFECT_AUTH: f"{MLFLOW_USER}:"}
    values, generated = {}, {}
    for variable, prefix in fresh.items():
        values[variable] = os.environ.get(variable) or _saved(root, variable)
        if not values[variable] and variable == ADMIN_PASSWORD and (root / AUTH_FOLDER / "basic_auth.db").exists():
            raise StackError(
                f"mlflow: {root / AUTH_FOLDER} holds users with an admin password not in {root / ENV_FILE}; set "
                f"{ADMIN_PASSWORD} to it"
            )
        if not os.environ.get(variable):
            values[variable] = generated[variable] = values[variable] or prefix + secrets.token_urlsafe(24)
    if ":" not in values[PREFECT_AUTH]:
        raise StackError(f"{PREFECT_AUTH} must be user:password (Prefect's basic auth), e.g. soups:<a long secret>")
    return Auth(values[ADMIN_PASSWORD], values[MLFLOW_PASSWORD], values[PREFECT_AUTH]), generated


def _kept_secrets(root: Path) -> dict[str, str]:
    """The credentials an earlier ``up`` with auth generated: stack.env keeps them for the next one."""
    saved = {variable: _saved(root, variable) for variable in (ADMIN_PASSWORD, MLFLOW_PASSWORD, PREFECT_AUTH)}
    return {variable: value for variable, value in saved.items() if value and not os.environ.get(variable)}


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to a file only its owner can read, from the first byte on."""
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
        out.write(text)
    partial.replace(path)


def write_env(root: Path, generated: dict[str, str], exports: dict[str, str] | None = None, auth: bool = False) -> None:
    """DIR/stack.env for ``source``: the secrets ``up`` generated (by their SOUPS_* names), PGPASSWORD from
    SOUPS_DB_PASSWORD and, with ``auth``, MLflow's and Prefect's client credentials from theirs; and
    ``exports``."""
    lines = [f"# soups stack at {root}: `. {root / ENV_FILE}` in every shell that uses it. Keep it private."]
    lines += [f"export {variable}={shlex.quote(value)}" for variable, value in generated.items()]
    if auth:
        lines.append(f"export MLFLOW_TRACKING_USERNAME={MLFLOW_USER}")
    for variable, (client, what) in CLIENT_VARIABLES.items():
        if auth or variable == PASSWORD_VARIABLE:
            lines.append(f'export {client}="${{{variable}:?set it to {what}}}"')
    lines += [f"export {name}={shlex.quote(value)}" for name, value in (exports or {}).items()]
    _write_private(root / ENV_FILE, "\n".join(lines) + "\n")


def write_overlay(root: Path, stack: Stack) -> None:
    """DIR/stack.yaml, a config for ``soups run``: tracking through the stack's servers (no password), and
    trials as flow runs of the trial deployment on the stack's workers."""
    import yaml

    tracking = {"root": str(root / "data"), "mlflow_uri": stack.mlflow_uri, "optuna_storage": stack.optuna_storage}
    overlay = {"tracking": tracking, "sweep": {"dispatch": "deployment"}}
    header = f"# Written by `soups stack up`; run `. {root / ENV_FILE}` first (the passwords).\n"
    (root / OVERLAY).write_text(header + yaml.safe_dump(overlay, sort_keys=False))


# --- the stack -----------------------------------------------------------------------------------------------


def wants_auth(options: StackOptions) -> bool:
    """Authentication is on when asked for, and always off loopback: other machines reach the servers there."""
    try:
        address = ipaddress.ip_address(options.host)
    except ValueError:
        raise StackError(f"--host must be an IP address of this machine, got {options.host!r}") from None
    return options.auth or not address.is_loopback


def _check_auth(options: StackOptions) -> None:
    """Off loopback the stack never starts without authentication: MLflow's basic-auth app and the Flask-WTF
    it imports (MLflow's ``auth`` extra) must be installed."""
    if not entry_points(group="mlflow.app", name="basic-auth") or importlib.util.find_spec("flask_wtf") is None:
        why = "--auth was given" if options.auth else f"--host {options.host} is not a loopback address"
        raise StackError(
            f"authentication is needed ({why}) but MLflow's basic-auth app cannot run here (it needs Flask-WTF); "
            "pip install 'mlflow[auth]' and start again"
        )


def _check(options: StackOptions) -> None:
    if wants_auth(options):
        _check_auth(options)
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


def _start_servers(
    root: Path, options: StackOptions, database: str, password: str, auth: Auth | None, track: Track
) -> tuple[str, str]:
    """MLflow and Prefect, started together and each given the whole timeout to answer; their URLs."""
    host, timeout = options.host, options.timeout
    mlflow, mlflow_process = start_mlflow(
        root, host, free_port(host, options.mlflow_port, "mlflow"), database, password, auth
    )
    track(mlflow)
    prefect_port = free_port(host, options.prefect_port, "prefect-server")
    prefect, prefect_process = start_prefect_server(root, host, prefect_port, database, password, auth)
    track(prefect)
    create_optuna_schema(database, password)  # meanwhile
    mlflow_auth, prefect_auth = (auth.mlflow_admin, auth.prefect) if auth else ("", "")
    mlflow_ready = partial(answers, f"{mlflow.address}/health", mlflow_auth)
    wait_ready(mlflow, mlflow_process, mlflow_ready, "answer /health", timeout)
    if auth:
        ensure_mlflow_user(root, mlflow.address, auth)
    prefect_ready = partial(answers, f"{prefect.address}/health", prefect_auth)
    wait_ready(prefect, prefect_process, prefect_ready, "answer /api/health", timeout)
    return mlflow.address, prefect.address


def _start_workers(root: Path, options: StackOptions, api: str, password: str, auth: Auth | None, track: Track) -> None:
    """The work pool, the trial deployment and the workers (one per GPU when there are GPUs), started
    together; returns once each worker has registered with the pool."""
    prefect_auth = auth.prefect if auth else ""
    ensure_work_pool(api, options.pool, prefect_auth)
    gpus = visible_gpus()
    workers = []
    for index in range(1, options.workers + 1):
        gpu = gpus[index - 1] if gpus else None
        worker, process = start_worker(root, api, options.pool, f"worker-{index}", password, gpu, auth)
        track(worker)
        workers.append((worker, process))
    deploy_trial(root, api, options.pool, auth)  # meanwhile
    for worker, process in workers:
        registered = partial(_is_registered, api, options.pool, worker_name(worker.name), prefect_auth)
        wait_ready(worker, process, registered, f"register with work pool {options.pool!r}", options.timeout)


def up(options: StackOptions) -> Stack:
    """Start every service and wait until each answers; on any failure (or Ctrl-C) stop what was started."""
    _check(options)
    root = options.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    password, generated = database_password(root)
    auth, secrets_made = stack_auth(root) if wants_auth(options) else (None, _kept_secrets(root))
    kept = {PASSWORD_VARIABLE: password} if generated else {}
    kept.update(secrets_made)
    if kept:  # kept before initdb and MLflow use them, so a failed first `up` cannot lose them
        write_env(root, kept)
    started: list[Service] = []

    def track(service: Service) -> None:
        started.append(service)
        _record(root, started)  # after every start, so an interrupted `up` can still be taken down

    try:
        database = _start_database(root, options, password, track)
        mlflow_uri, api = _start_servers(root, options, database, password, auth, track)
        _start_workers(root, options, api, password, auth, track)
    except BaseException:
        for service in reversed(started):
            stop_any(root, service)
        (root / RECORD).unlink(missing_ok=True)
        raise
    stack = Stack(root, started, mlflow_uri, api, database_url(database, "optuna"), generated, auth is not None)
    write_overlay(root, stack)
    checkout = os.environ.get("SOUPS_CHECKOUT", str(CHECKOUT))
    exports = {"PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": mlflow_uri, "SOUPS_CHECKOUT": checkout}
    write_env(root, kept, exports, auth is not None)
    return stack


def status(root: Path) -> list[tuple[Service, bool]]:
    root = root.resolve()
    restarted = running_postmaster(root) is not None  # `pg_ctl restart` gives the cluster a new postmaster
    return [(s, is_running(s) or (s.name == "postgres" and restarted)) for s in recorded(root)]


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
