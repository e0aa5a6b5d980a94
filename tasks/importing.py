"""Register checkpoints fine-tuned elsewhere as ingredients, laid out like a sweep trial's, so the kitchen's
`gather_ingredients` finds, downloads and checksums them unchanged.

Plain functions, not Prefect tasks: an import is a short sequential job with nothing to retry or fan out. Each
file is one MLflow run (``kind=import``) holding the converted checkpoint as ``checkpoint/<stem>.safetensors``,
and one version of ``<experiment>-ingredients`` created from that run. Imports are idempotent: a file (or its
weights, in any format) already registered for the study is skipped, so a failed batch can simply be re-run.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from soups.checkpoint import file_sha256
from soups.config import PipelineConfig
from soups.importing import ConvertedCheckpoint, convert
from soups.models import model_config
from tasks.adapters.packaging import link_or_copy, local_folder
from tasks.adapters.tracking import (
    CHECKPOINT_ARTIFACT,
    client_for,
    ensure_experiment,
    ingredients_model_name,
    log_params,
    register_ingredient,
    tracked_run,
)

_DIGEST_TAGS = ("sha256", "source_sha256", "weights_sha256")


def import_checkpoints(config: PipelineConfig, files: Sequence[Path], fmt: str = "auto") -> list[str]:
    """Import ``files`` for ``config.study_name`` as architecture ``config.model.name``; the version of each file
    in order (the existing version for a file skipped as already registered)."""
    missing = [str(p) for p in files if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"no such checkpoint file: {', '.join(missing)}; nothing was imported")
    model_config(config.model.name)  # an unknown architecture fails before anything is created
    experiment_id = ensure_experiment(config)
    client = client_for(config.tracking)
    study = _study_versions(client, config)
    known = {v.tags[tag]: str(v.version) for v in study for tag in _DIGEST_TAGS if tag in v.tags}
    next_index = sum("source_sha256" in v.tags for v in study)
    versions = []
    for path in map(Path, files):
        source_sha256 = file_sha256(path)
        if source_sha256 in known:
            versions.append(_skipped(config, path, known[source_sha256], "this file"))
            continue
        # Scratch beside the store, so a local store links the converted file in instead of copying it.
        config.tracking.root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".soups-import-", dir=config.tracking.root) as scratch:
            converted = convert(path, config.model.name, fmt, Path(scratch))
            for note in converted.notes:
                print(f"{path}: note: {note}")
            if converted.weights_sha256 in known:
                versions.append(_skipped(config, path, known[converted.weights_sha256], "the same weights"))
                continue
            version = _register(client, experiment_id, config, converted, source_sha256, next_index)
        next_index += 1
        known.update({source_sha256: version, converted.sha256: version, converted.weights_sha256: version})
        versions.append(version)
        print(
            f"{path}: registered as version {version} of {ingredients_model_name(config)} "
            f"({converted.format}, {converted.num_classes} classes)"
        )
    return versions


def _study_versions(client: MlflowClient, config: PipelineConfig) -> list[ModelVersion]:
    """The study's registered ingredients, refusing an architecture other than theirs: the kitchen could not
    average them (it loads every ingredient as ``model.name``)."""
    versions = client.search_model_versions(f"name='{ingredients_model_name(config)}'")
    study = [v for v in versions if v.tags.get("study") == config.study_name]
    others = sorted({v.tags.get("model_name") for v in study} - {config.model.name}, key=str)
    if others:
        raise ValueError(
            f"study {config.study_name!r} already holds ingredients of architecture {', '.join(map(str, others))}, "
            f"not {config.model.name!r}; import into another experiment (--experiment) or fix --model"
        )
    return study


def _skipped(config: PipelineConfig, path: Path, version: str, what: str) -> str:
    print(f"{path}: skipped: {what} is already version {version} of {ingredients_model_name(config)}")
    return version


def _register(
    client: MlflowClient,
    experiment_id: str,
    config: PipelineConfig,
    converted: ConvertedCheckpoint,
    source_sha256: str,
    index: int,
) -> str:
    """One ``kind=import`` run holding the checkpoint, and a version whose tags are set at creation (as a trial's
    are), so a version never exists without its sha256."""
    source_file = str(converted.source.resolve())
    run_tags = {"kind": "import", "study": config.study_name, "source_file": source_file}
    with tracked_run(client, experiment_id, f"import-{converted.source.stem}", run_tags) as run_id:
        params = {"source_file": source_file, "format": converted.format, "model_name": config.model.name}
        log_params(client, run_id, {**params, "num_classes": str(converted.num_classes)})
        store = local_folder(client.get_run(run_id).info.artifact_uri)
        if store is None:
            client.log_artifact(run_id, str(converted.path), CHECKPOINT_ARTIFACT)
        else:  # written once: the store's file is the converted one
            link_or_copy(converted.path, store / CHECKPOINT_ARTIFACT / converted.path.name)
        tags = {
            "study": config.study_name,
            "trial_number": str(index),
            "heldout_accuracy": "nan",
            "source_file": source_file,
            "source_sha256": source_sha256,
            "weights_sha256": converted.weights_sha256,
            "format": converted.format,
        }
        source = f"{client.get_run(run_id).info.artifact_uri}/{CHECKPOINT_ARTIFACT}"
        version = register_ingredient(client, config, run_id, source, converted.path.name, converted.sha256, tags)
    return str(version.version)
