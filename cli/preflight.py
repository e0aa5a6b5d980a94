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
    has no workers, so its trials would wait forever. The server PREFECT_API_URL names must take this client's
    PREFECT_API_AUTH_STRING."""
    api = os.environ.get("PREFECT_API_URL")
    if command in ("run", "sweep") and config.sweep.dispatch == "deployment" and not api:
        raise UsageError(
            "sweep.dispatch is 'deployment' but PREFECT_API_URL names no Prefect server: `. DIR/stack.env` after "
            "`soups stack up --root DIR`, or export PREFECT_API_URL of the server your workers poll"
        )
    if api:
        check_prefect_credentials(api.rstrip("/"))


def check_prefect_credentials(api: str, timeout: float = 5.0) -> None:
    """A Prefect server with an auth string answers 401 to a wrong or missing one: one line naming the variable,
    before any flow run (Prefect's client would fail with a traceback). Other failures are Prefect's to report."""
    import base64
    import urllib.error
    import urllib.request

    auth = os.environ.get("PREFECT_API_AUTH_STRING")
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    request = urllib.request.Request(f"{api}/flow_runs/filter", data=b'{"limit": 1}', headers=headers)
    try:
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError as err:
        if err.code == 401:
            given = "" if auth else ", which is not set"
            raise UsageError(
                f"the Prefect server at {api} (PREFECT_API_URL) refused PREFECT_API_AUTH_STRING{given} (401): source "
                "DIR/stack.env of the stack that serves it (`. DIR/stack.env`), or export its user:password"
            ) from None
    except OSError:
        return
