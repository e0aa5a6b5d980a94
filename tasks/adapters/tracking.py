"""MLflow plumbing shared by the tasks: one client per call site, explicit run ids (the fluent API's active
run is thread-local, and trials run in threads), and the experiment and registered models created once,
before any fan-out, so concurrent SQLite writers never race to create them."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from soups.config import PipelineConfig, TrackingConfig

PARENT_RUN_TAG = "mlflow.parentRunId"
FLOW_RUN_TAG = "prefect.flow_run_id"
"""The Prefect flow run an MLflow run was made in (set by tasks.context.run_context)."""
TAG_LIMIT = 5000
"""The longest tag or parameter value written (MLflow's own limits are 8000 and 6000 characters)."""


def bounded(value: str, run_id: str) -> str:
    """A tag or parameter value as MLflow can store it: whole, or, when longer, where the whole is."""
    if len(value) <= TAG_LIMIT:
        return value
    return f"{len(value)} characters, see details.json of run {run_id}"


def client_for(tracking: TrackingConfig) -> MlflowClient:
    uri = with_installed_driver(tracking.resolved_mlflow_uri())
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def with_installed_driver(uri: str) -> str:
    """SQLAlchemy 2.1 reads postgresql:// as psycopg 3; the project installs psycopg2-binary, so a bare
    postgresql:// URL uses psycopg2 when psycopg is absent (an explicit postgresql+driver:// is kept)."""
    import importlib.util

    bare = uri.startswith("postgresql://")
    if bare and importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + uri.removeprefix("postgresql://")
    return uri


def ingredients_model_name(config: PipelineConfig) -> str:
    return f"{config.experiment}-ingredients"


class TrackingUnavailableError(RuntimeError):
    """The MLflow store cannot be used (server unreachable, missing driver, database of another MLflow
    version); the message says what and how to fix it, in one line."""


@contextmanager
def stores_lock(tracking: TrackingConfig, timeout: float = 600) -> Iterator[None]:
    """Held while the MLflow and Optuna stores (and the experiment, models and study) are first created, so
    processes started together on a fresh data root never race in the schema migrations. An OS file lock:
    released when its holder dies."""
    from filelock import FileLock, Timeout

    tracking.root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(tracking.root / ".stores.lock"))
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise TrackingUnavailableError(
            f"another soups process has held {lock.lock_file} for over {timeout:.0f}s while creating the stores; "
            "wait for it to finish, or stop it"
        ) from None
    try:
        yield
    finally:
        lock.release()


def check_reachable(tracking: TrackingConfig, timeout: float = 5.0) -> None:
    """Fail at once, in one line, when the tracking URI is an MLflow server nobody answers at (instead of
    MLflow's minutes of retries on every call), or one that refuses this client's credentials."""
    import socket
    from urllib.parse import urlsplit

    uri = tracking.resolved_mlflow_uri()
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise TrackingUnavailableError(
            f"the MLflow server at {parts.scheme}://{parts.hostname}:{port} (tracking.mlflow_uri) is unreachable "
            f"({reason} within {timeout:.0f}s); start it (mlflow server --host {parts.hostname} --port {port} ...) "
            "or point tracking.mlflow_uri at a running one (null: a local sqlite store under tracking.root)"
        ) from None
    _check_credentials(uri.rstrip("/"), f"{parts.scheme}://{parts.hostname}:{port}", timeout)


def _check_credentials(uri: str, shown: str, timeout: float) -> None:
    """A server with authentication answers 401 to a wrong or missing password: one line naming the variables
    MLflow reads them from (MLflow itself would fail later, with a traceback, after the first writes)."""
    import base64
    import os
    import urllib.error
    import urllib.request

    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    request = urllib.request.Request(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1")
    if user and password:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError as err:
        if err.code not in (401, 403):
            return  # not a credentials problem: MLflow's own calls report it
        given = "" if user and password else ", which are not set"
        raise TrackingUnavailableError(
            f"the MLflow server at {shown} refused the credentials in MLFLOW_TRACKING_USERNAME/"
            f"MLFLOW_TRACKING_PASSWORD{given} ({err.code}): source DIR/stack.env of the stack that serves it "
            "(`. DIR/stack.env`), or export its user and password"
        ) from None
    except OSError:
        return  # reachable a moment ago: MLflow's own calls report what went wrong


def shown_uri(uri: str) -> str:
    """A database URI without its password."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(uri).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for a message
        return uri.split("@")[-1]


def _other_version(uri: str, detail: str) -> TrackingUnavailableError:
    import mlflow

    return TrackingUnavailableError(
        f"the MLflow database at {shown_uri(uri)} was made by another MLflow version ({detail}; this is MLflow "
        f"{mlflow.__version__}): back it up and run `mlflow db upgrade {shown_uri(uri)}` if it is older, use the "
        "MLflow version that made it, or give tracking.root a fresh folder"
    )


def check_schema(uri: str) -> None:
    """An existing MLflow database must carry this MLflow's schema revision: an older or newer one fails
    later with alembic's "Can't locate revision" or "Online migration expected" (or SQL errors mid-run)."""
    if "://" not in uri or uri.split(":", 1)[0] in ("http", "https", "databricks", "file"):
        return
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return
    import sqlalchemy
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config, _get_latest_schema_revision

    engine = sqlalchemy.create_engine(uri)
    try:
        with engine.connect() as connection:
            if "alembic_version" not in sqlalchemy.inspect(connection).get_table_names():
                return  # empty (or not yet migrated): MLflow creates the tables under stores_lock
            found = MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
    expected = _get_latest_schema_revision()
    if found is None or found == expected:
        return
    known = {script.revision for script in ScriptDirectory.from_config(_get_alembic_config("")).walk_revisions()}
    age = "an older schema" if found in known else "a schema this MLflow does not know, so a newer MLflow"
    raise _other_version(uri, f"revision {found}, {age}; expected {expected}")


# Database drivers SQLAlchemy imports for a URL scheme -> what to install (postgresql:// means psycopg 3 on
# SQLAlchemy 2.1; postgresql+psycopg2:// asks for psycopg2).
DRIVER_PACKAGES = {
    "psycopg2": "psycopg2-binary",
    "psycopg": "psycopg[binary] (or psycopg2-binary with a postgresql+psycopg2:// URL)",
    "pymysql": "PyMySQL",
    "MySQLdb": "mysqlclient",
    "pymssql": "pymssql",
    "asyncpg": "asyncpg",
}
_MIGRATION_MESSAGES = ("Can't locate revision", "Online migration expected", "out-of-date database schema")


def ensure_experiment(config: PipelineConfig) -> str:
    """Create (or find) the experiment and both registered models; returns the experiment id. Checks the
    store first (a server that answers; a database of this MLflow's schema) and creates it under the data
    root's lock, so a problem is one line and concurrent first runs never race in the migrations."""
    config.tracking.root.mkdir(parents=True, exist_ok=True)
    check_reachable(config.tracking)
    uri = with_installed_driver(config.tracking.resolved_mlflow_uri())
    with stores_lock(config.tracking):
        try:
            check_schema(uri)
            from tasks.adapters.relocation import relocate_root

            relocate_root(config.tracking)  # a moved or copied local root: its stored locations follow it
            return _ensure_experiment(config)
        except ImportError as err:
            if err.name not in DRIVER_PACKAGES:
                raise
            raise TrackingUnavailableError(
                f"the MLflow store {shown_uri(uri)} needs the {err.name} database driver, which is not installed: "
                f"install {DRIVER_PACKAGES[err.name]}, or leave tracking.mlflow_uri null for a local sqlite store"
            ) from None
        except Exception as err:
            import sqlalchemy.exc

            text = " ".join(str(err).split())
            if any(message in text for message in _MIGRATION_MESSAGES):
                raise _other_version(uri, text[:300]) from None
            if isinstance(err, sqlalchemy.exc.OperationalError):
                raise TrackingUnavailableError(
                    f"cannot open the MLflow database {shown_uri(uri)}: {' '.join(str(err.orig or err).split())[:300]}"
                    "; start that database or fix tracking.mlflow_uri"
                ) from None
            raise


def _ensure_experiment(config: PipelineConfig) -> str:
    client = client_for(config.tracking)
    experiment = client.get_experiment_by_name(config.experiment)
    if experiment is None:
        # A tracking server keeps artifacts where it serves them from (workers on other machines upload through
        # it); only a local store gets the data root's artifacts folder.
        location = None if config.tracking.served() else config.tracking.artifact_root()
        experiment_id = client.create_experiment(config.experiment, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    for name in (ingredients_model_name(config), config.experiment):
        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(
                name, tags={"experiment": config.experiment}, description=_registered_model_description(config, name)
            )
    return experiment_id


def _registered_model_description(config: PipelineConfig, name: str) -> str:
    if name == ingredients_model_name(config):
        return (
            f"Fine-tuned ingredients of experiment {config.experiment}: one version per finished sweep trial (or "
            "imported checkpoint), tagged with its study, trial number, held-out accuracy on the whole held-out "
            "split and the checkpoint's sha256. The kitchen cooks soups from them."
        )
    return (
        f"Soups and baselines of experiment {config.experiment}, cooked by the kitchen from {config.experiment}-"
        "ingredients; each version is tagged with its recipe, ingredient versions and held-out score (scoring "
        "part). Alias `champion`: the promoted model; `challenger`: the best candidate that did not beat it."
    )


CHECKPOINT_ARTIFACT = "checkpoint"
"""Where a run that registers a plain checkpoint file (an import) keeps it."""


def register_ingredient(
    client: MlflowClient,
    config: PipelineConfig,
    run_id: str,
    source: str,
    weights: str,
    sha256: str,
    tags: Mapping[str, str],
    description: str | None = None,
    model_id: str | None = None,
):
    """A version of ``<experiment>-ingredients`` from ``source`` (a trial's logged pyfunc model ``model_id``, or
    an import run's ``checkpoint`` folder), with the tags the kitchen reads set at creation (a version never
    exists without its sha256): ``weights`` (the weights file's path inside the source), ``sha256`` (of that
    file), ``model_name``, and study, trial number and held-out accuracy from the caller. (A tracking server
    accepts a source only inside the run or logged model the request names.)"""
    return client.create_model_version(
        ingredients_model_name(config),
        source=source,
        run_id=run_id,
        tags={**tags, "weights": weights, "sha256": sha256, "model_name": config.model.name},
        description=description,
        model_id=model_id,
    )


def weights_uri(version) -> str:
    """Where a registered ingredient's weights file is (versions registered before the ``weights`` tag name
    their file in ``checkpoint``)."""
    return f"{version.source}/{version.tags.get('weights') or version.tags['checkpoint']}"


def log_context(client: MlflowClient, run_id: str, config: PipelineConfig) -> None:
    """The whole validated config as an artifact (and its stage settings as params), so a run says what made it."""
    client.log_dict(run_id, config.model_dump(mode="json"), "config.json")
    params = {
        "sweep.sampler": config.sweep.sampler,
        "sweep.seed": str(config.sweep.seed),
        "sweep.n_trials": str(config.sweep.n_trials),
        "sweep.parallel": str(config.sweep.parallel),
        "space": json.dumps({k: v.model_dump(exclude_defaults=True) for k, v in config.space.items()}),
        "kitchen.recipes": ",".join(choice.key for choice in config.kitchen.recipes),
        "kitchen.promotion_metric": config.kitchen.promotion_metric,
        "model.name": config.model.name,
        "data.name": config.data.name,
    }
    log_params(client, run_id, params)


def fail_run(client: MlflowClient, run_id: str, reason: str) -> None:
    """Close a run some dead process left RUNNING: FAILED, with the reason as its ``failure_reason`` tag."""
    client.set_tag(run_id, "failure_reason", reason[:TAG_LIMIT])
    client.set_terminated(run_id, "FAILED")


def flat_params(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings as MLflow params ('train.lr': '0.0003'), so every hyperparameter is searchable."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flat_params(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return flat


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])


@contextmanager
def tracked_run(
    client: MlflowClient,
    experiment_id: str,
    name: str,
    tags: Mapping[str, str],
    killed_by: tuple[type[BaseException], ...] = (),
    resume: str | None = None,
) -> Iterator[str]:
    """An MLflow run that ends FINISHED, or FAILED with a ``failure_reason`` tag when the block raises (KILLED
    with a ``killed_reason`` tag for the ``killed_by`` exceptions, e.g. a pruned trial): never left RUNNING.
    ``resume``: the id of a FAILED run to reopen instead (its failure moves to the ``previous_failure`` tag)."""
    if resume is None:
        run_id = client.create_run(experiment_id, run_name=name, tags=dict(tags)).info.run_id
    else:
        run_id = resume
        previous = client.get_run(run_id).data.tags.get("failure_reason")
        client.update_run(run_id, status="RUNNING")
        if previous is not None:
            client.set_tag(run_id, "previous_failure", previous)
            client.delete_tag(run_id, "failure_reason")
    try:
        yield run_id
    except BaseException as err:
        killed = isinstance(err, killed_by)
        reason = f"{type(err).__name__}: {err}"[:TAG_LIMIT]
        client.set_tag(run_id, "killed_reason" if killed else "failure_reason", reason)
        client.set_terminated(run_id, "KILLED" if killed else "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


def nested_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> dict[str, Any]:
    """The runs nested under ``parent_run_id``, by run name (the newest when a name repeats)."""
    found = client.search_runs(
        [experiment_id],
        f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}'",
        max_results=10_000,
        order_by=["attributes.start_time ASC"],
    )
    return {run.info.run_name: run for run in found}


def log_dataset_input(client: MlflowClient, run_id: str, config: PipelineConfig, split: str, labels, context: str):
    """One split as an MLflow dataset input of the run (digest of its labels, source = how it was loaded,
    ``context`` e.g. training or evaluation), so the run page says what it was trained or scored on."""
    import mlflow
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.entities import DatasetInput, InputTag

    source = CodeDatasetSource({"dataset": config.data.model_dump_json(by_alias=True), "split": split})
    dataset = mlflow.data.from_numpy(labels.numpy(), source=source, name=f"{config.data.name}-{split}")
    inputs = [DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", context)])]
    try:
        client.log_inputs(run_id, inputs)
    except MlflowException:
        # MLflow inserts a dataset it has not seen, unchecked: two trials logging the same split at once race
        # on the table's unique key (seen with two sweeps on one SQLite store). Once, the other has stored it.
        client.log_inputs(run_id, inputs)


def ui_url(tracking: TrackingConfig, page: str) -> str:
    """An MLflow UI page (``page`` after ``#/``, e.g. ``models/<name>/versions/<n>``): on the tracking server
    itself, or where `mlflow ui --backend-store-uri <the local store>` serves it by default."""
    base = tracking.resolved_mlflow_uri().rstrip("/") if tracking.served() else "http://127.0.0.1:5000"
    return f"{base}/#/{page}"


def run_url(tracking: TrackingConfig, client: MlflowClient, run_id: str) -> str:
    return ui_url(tracking, f"experiments/{client.get_run(run_id).info.experiment_id}/runs/{run_id}")
