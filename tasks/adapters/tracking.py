"""MLflow plumbing shared by the tasks: one client per call site, explicit run ids (the fluent API's active
run is thread-local, and trials run in threads), and the experiment and registered models created once,
before any fan-out, so concurrent SQLite writers never race to create them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from soups.config import PipelineConfig, TrackingConfig

PARENT_RUN_TAG = "mlflow.parentRunId"
_TAG_LIMIT = 5000


def client_for(tracking: TrackingConfig) -> MlflowClient:
    uri = tracking.resolved_mlflow_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ingredients_model_name(config: PipelineConfig) -> str:
    return f"{config.experiment}-ingredients"


def ensure_experiment(config: PipelineConfig) -> str:
    """Create (or find) the experiment and both registered models; returns the experiment id."""
    config.tracking.root.mkdir(parents=True, exist_ok=True)
    client = client_for(config.tracking)
    experiment = client.get_experiment_by_name(config.experiment)
    if experiment is None:
        experiment_id = client.create_experiment(config.experiment, artifact_location=config.tracking.artifact_root())
    else:
        experiment_id = experiment.experiment_id
    for name in (ingredients_model_name(config), config.experiment):
        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(name, tags={"experiment": config.experiment})
    return experiment_id


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


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def local_artifact(client: MlflowClient, run_id: str, artifact_path: str, into: Path) -> Path:
    """Download one artifact of a run (a no-op copy for local stores) and return its local path."""
    into.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, artifact_path, str(into)))


@contextmanager
def tracked_run(
    client: MlflowClient,
    experiment_id: str,
    name: str,
    tags: Mapping[str, str],
    killed_by: tuple[type[BaseException], ...] = (),
) -> Iterator[str]:
    """An MLflow run that ends FINISHED, or FAILED with a ``failure_reason`` tag when the block raises (KILLED
    with a ``killed_reason`` tag for the ``killed_by`` exceptions, e.g. a pruned trial): never left RUNNING."""
    run_id = client.create_run(experiment_id, run_name=name, tags=dict(tags)).info.run_id
    try:
        yield run_id
    except BaseException as err:
        killed = isinstance(err, killed_by)
        reason = f"{type(err).__name__}: {err}"[:_TAG_LIMIT]
        client.set_tag(run_id, "killed_reason" if killed else "failure_reason", reason)
        client.set_terminated(run_id, "KILLED" if killed else "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
