"""A trial's training states in its MLflow run's artifacts, so a retry on any machine resumes where it stopped.

Each state is a pair under ``training/``: ``epoch-000k.safetensors``, then ``epoch-000k.json`` with its sha256.
The json is uploaded last and is the commit mark: a reader takes the highest epoch whose json parses and whose
file matches it, so an upload cut off half-way is never read. After a new pair lands the older one is deleted,
and all of them once the trial's ingredient is registered (a state is ~3x the model with AdamW's moments).
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from mlflow import MlflowClient
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from soups.checkpoint import CheckpointError, file_sha256
from soups.training_state import TrainingState, load_training_state, save_training_state

FOLDER = "training"
_MARK = re.compile(r"epoch-(\d+)\.json")


def _repository(client: MlflowClient, run_id: str):
    run = client.get_run(run_id)
    return get_artifact_repository(run.info.artifact_uri, tracking_uri=client.tracking_uri)


def _epochs(repository) -> list[int]:
    """Epochs with a commit mark, newest first."""
    names = [Path(info.path).name for info in repository.list_artifacts(FOLDER)]
    return sorted((int(m.group(1)) for name in names if (m := _MARK.fullmatch(name))), reverse=True)


def state_uploader(client: MlflowClient, run_id: str, staging: Path) -> Callable[[TrainingState], None]:
    """``finetune``'s ``on_state``: write the state under ``staging``, upload it and its mark, drop older ones."""
    repository = _repository(client, run_id)

    def upload(state: TrainingState) -> None:
        stem = f"epoch-{state.epoch:04d}"
        with tempfile.TemporaryDirectory(dir=staging, prefix=f".{run_id}-") as folder:
            path = save_training_state(state, Path(folder) / f"{stem}.safetensors")
            repository.log_artifact(str(path), FOLDER)
            mark = Path(folder) / f"{stem}.json"
            mark.write_text(json.dumps({"epoch": state.epoch, "sha256": file_sha256(path)}))
            repository.log_artifact(str(mark), FOLDER)
        for epoch in _epochs(repository)[1:]:
            _delete_pair(repository, epoch)

    return upload


def latest_state(client: MlflowClient, run_id: str, staging: Path) -> TrainingState | None:
    """The newest complete state of a run (None when it saved none): downloaded under ``staging``, checked
    against its mark's sha256, read without unpickling. A pair that fails its check is skipped for an older one."""
    repository = _repository(client, run_id)
    for epoch in _epochs(repository):
        stem = f"{FOLDER}/epoch-{epoch:04d}"
        with tempfile.TemporaryDirectory(dir=staging, prefix=f".{run_id}-") as folder:
            try:
                mark = json.loads(Path(repository.download_artifacts(f"{stem}.json", folder)).read_text())
                path = Path(repository.download_artifacts(f"{stem}.safetensors", folder))
                if file_sha256(path) != mark["sha256"]:
                    raise CheckpointError(f"{stem}.safetensors does not match its sha256")
                return load_training_state(path)
            except (OSError, ValueError, KeyError, TypeError, CheckpointError) as err:
                print(f"training state {stem} of run {run_id} skipped: {type(err).__name__}: {err}")
    return None


def delete_states(client: MlflowClient, run_id: str) -> None:
    """Drop every training state of a run (its ingredient is registered, or it will never be resumed). A failure
    is reported, never raised over what the caller is doing: the states are only storage."""
    try:
        repository = _repository(client, run_id)
        if repository.list_artifacts(FOLDER):
            repository.delete_artifacts(FOLDER)
    except Exception as err:  # noqa: BLE001 - e.g. the artifact store briefly away
        print(f"training states of run {run_id} not deleted: {type(err).__name__}: {err}")


def _delete_pair(repository, epoch: int) -> None:
    """The mark first: a reader never takes a mark whose file is gone."""
    for suffix in ("json", "safetensors"):
        repository.delete_artifacts(f"{FOLDER}/epoch-{epoch:04d}.{suffix}")
