"""Checks made before a Prefect server starts, so a bad start or store is one line, not a failed flow run."""

from __future__ import annotations

import os

from cli.common import UsageError
from soups.pretrained import PretrainedStart


def check_pretrained(start: PretrainedStart) -> None:
    """A pretrained start that is a file must hold tensors only: fail here, in one line, before a server starts
    (torch's own error for a pickled file even suggests loading it unsafely)."""
    path = start.path if start.kind == "file" else None
    if path is None or not path.is_file():
        return  # an open_clip tag, a folder, or a missing file: the flow says which
    from soups.checkpoint import CheckpointError, read_header

    if path.suffix == ".safetensors":
        try:
            read_header(path)
        except CheckpointError as err:
            raise UsageError(f"model.pretrained: {err}") from None
        return
    import pickle
    import zipfile

    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise UsageError(unsafe_checkpoint(path, err)) from None


def unsafe_checkpoint(path, err: BaseException) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "weights_only" in first or "Weights only load failed" in first:
        first = "it holds pickled Python objects, not only tensors"
    return (
        f"model.pretrained {path} cannot be loaded as plain tensors ({first}); such files are never unpickled "
        "here: convert it to safetensors where you trust it (safetensors.torch.save_file(state_dict, "
        "'start.safetensors')) and point model.pretrained at that file"
    )


def check_stores(config, command: str) -> str:
    """The MLflow store (server reachable, database of this MLflow) and, for stages that sweep, the Optuna
    storage (its driver installed) are checked, and created, before a Prefect server starts. Returns the
    experiment id: the command's flow takes it instead of ensuring the experiment again."""
    from tasks.adapters.tracking import check_reachable, ensure_experiment

    check_reachable(config.tracking)
    if command in ("run", "sweep"):
        from tasks.adapters.studies import open_study

        open_study(config)
    return ensure_experiment(config)


def check_dispatch(config, command: str) -> None:
    """Trials dispatched as flow runs need the Prefect server that the pool's workers poll; a temporary server
    has no workers, so its trials would wait forever."""
    if command in ("run", "sweep") and config.sweep.dispatch == "deployment" and not os.environ.get("PREFECT_API_URL"):
        raise UsageError(
            "sweep.dispatch is 'deployment' but PREFECT_API_URL names no Prefect server: `. DIR/stack.env` after "
            "`soups stack up --root DIR`, or export PREFECT_API_URL of the server your workers poll"
        )
