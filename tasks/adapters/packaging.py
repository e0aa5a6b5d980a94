"""Package a classifier as an MLflow pyfunc model from code: weights (safetensors) and a JSON spec as
artifacts, a signature, explicit pip requirements and the ``soups`` package as code; nothing pickled.

The model is saved locally and uploaded to the run through an explicit client, so no fluent MLflow state
(tracking URI, active run) is touched.
"""

from __future__ import annotations

import os
import shutil
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
from mlflow import MlflowClient

from soups.serving import PREDICTED, WEIGHTS_FILE, ClassifierSpec, write_spec

MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
SOUPS_PACKAGE = Path(__file__).resolve().parents[2] / "soups"
MODEL_ARTIFACT = "classifier"
MODEL_WEIGHTS = f"artifacts/{WEIGHTS_FILE}"
"""The weights file inside a logged classifier model (pyfunc keeps its artifacts under ``artifacts/``)."""


def pip_requirements() -> list[str]:
    pinned = ["torch", "torchvision", "open_clip_torch", "safetensors", "numpy", "pydantic", "pandas", "scikit-learn"]
    return [f"{name}=={metadata.version(name)}" for name in pinned]


def log_classifier_model(
    client: MlflowClient, run_id: str, checkpoint: Path, spec: ClassifierSpec, folder: Path, name: str
) -> tuple[str, str]:
    """Save the model under ``folder`` and upload it as an MLflow logged model called ``name`` (the recipe's
    candidate name: what the run's and the experiment's Models tabs list), made by the run; returns its
    artifact location and its id, what a registry version is created from (a ``models:/<id>`` source would
    be resolved through MLflow's global tracking URI, which this platform never sets)."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS_FILE  # the name the spec loads; a link, not a copy
    link_or_copy(checkpoint, weights)
    spec_path = write_spec(spec, folder)
    size = spec.preprocess.size
    signature = ModelSignature(  # in: uint8 images; out: the predicted class name, then each class's probability
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, size, size, 3))]),
        outputs=Schema([ColSpec("string", PREDICTED), *(ColSpec("float", name) for name in spec.classnames)]),
    )
    model_dir = folder / MODEL_ARTIFACT
    shutil.rmtree(model_dir, ignore_errors=True)
    mlflow.pyfunc.save_model(
        str(model_dir),
        python_model=str(MODEL_CODE),
        artifacts={"weights": str(weights), "spec": str(spec_path)},
        code_paths=[str(SOUPS_PACKAGE)],
        pip_requirements=pip_requirements(),
        signature=signature,
        input_example=np.full((1, size, size, 3), 128, dtype=np.uint8),  # one grey image, as a caller sends it
    )
    from mlflow.entities import LoggedModelStatus

    link_or_copy(checkpoint, model_dir / MODEL_WEIGHTS)  # save_model copied it: the package links it again
    experiment_id = client.get_run(run_id).info.experiment_id
    logged = client.create_logged_model(experiment_id, name=name, source_run_id=run_id, model_type="classifier")
    store = local_folder(logged.artifact_location)
    if store is None:
        client.log_model_artifacts(logged.model_id, str(model_dir))
    else:  # a local artifact store: linked in, so the registered weights are the cooked file itself
        for source in sorted(model_dir.rglob("*")):
            if source.is_file():
                link_or_copy(source, store / source.relative_to(model_dir))
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    return logged.artifact_location, logged.model_id


def link_or_copy(source: Path, target: Path) -> None:
    """``target`` as a hard link of ``source`` (a copy across filesystems), replacing what was there."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another filesystem
        shutil.copyfile(source, target)


def local_folder(uri: str) -> Path | None:
    """The folder a ``file:`` artifact location (or a plain path) names; None for a remote store."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        return None
    return Path(url2pathname(parsed.path))


def logged_model_of(client: MlflowClient, run_id: str, name: str) -> tuple[str, str] | None:
    """The logged model ``name`` that run ``run_id`` uploaded whole (READY), as (artifact location, id)."""
    from mlflow.entities import LoggedModelStatus

    experiment_id = client.get_run(run_id).info.experiment_id
    for model in client.search_logged_models([experiment_id], filter_string=f"name = '{name}'"):
        if model.source_run_id == run_id and model.status == LoggedModelStatus.READY:
            return model.artifact_location, model.model_id
    return None


def download_model_weights(client: MlflowClient, name: str, version: str, folder: Path) -> Path:
    """The safetensors weights of a registered version, fetched locally from its source (never unpickled)."""
    import mlflow

    registered = client.get_model_version(name, version)
    folder.mkdir(parents=True, exist_ok=True)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=registered.source, dst_path=str(folder), tracking_uri=client.tracking_uri
    )
    weights = next(Path(local).rglob(WEIGHTS_FILE), None)
    if weights is None:
        raise FileNotFoundError(f"version {version} of {name} has no {WEIGHTS_FILE}; cannot score it")
    return weights
