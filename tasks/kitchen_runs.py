"""A kitchen that fails late loses nothing. What it cooked stays in its work folder, recorded step by step
(`soups.cooking.save_cooked`); its MLflow run ends FAILED with the reason and the step as tags; and the next
kitchen of the same config, ingredients and code reopens that run and goes on where it stopped: recorded steps
are read back instead of cooked again, registered weights keep their versions, unfinished runs are reopened.
"""

from __future__ import annotations

import hashlib
import json
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from mlflow import MlflowClient

from soups.config import PipelineConfig
from tasks.adapters.tracking import client_for, tracked_run
from tasks.context import RunContext, git_commit, run_context

FINGERPRINT_TAG = "kitchen.fingerprint"


@contextmanager
def kitchen_run(config: PipelineConfig, experiment_id: str, ingredients: dict[str, str]) -> Iterator[RunContext]:
    """The kitchen's MLflow run, opened (or, when a kitchen with the same fingerprint failed, reopened) around
    the block; ``ingredients``: version -> sha256. A failure inside keeps its work (`failures_kept`)."""
    client = client_for(config.tracking)
    fingerprint = kitchen_fingerprint(config, ingredients)
    resume = resumable_kitchen(client, experiment_id, fingerprint)
    if resume is not None:
        print(f"going on with kitchen run {resume}, which failed with this config and these ingredients")
    tags = {
        "kind": "kitchen",
        "study": config.study_name,
        FINGERPRINT_TAG: fingerprint,
        **run_context("flows/kitchen.py:kitchen_flow"),
    }
    with tracked_run(client, experiment_id, f"kitchen-{config.study_name}", tags, resume=resume) as run_id:
        workdir = (config.tracking.root / "kitchen" / run_id).resolve()
        with failures_kept(client, run_id, workdir, "soups kitchen"):
            yield RunContext(config, client, experiment_id, run_id, workdir, resumed=resume is not None)


class StepFailed(RuntimeError):
    """One late step of the kitchen (registering, logging, promoting) failed at one candidate."""

    def __init__(self, step: str, candidate: str, cause: BaseException) -> None:
        self.step, self.candidate = step, candidate
        reason = " ".join(f"{type(cause).__name__}: {cause}".split())
        super().__init__(f"{step} failed at candidate {candidate!r}: {reason[:400]}")


@contextmanager
def failing_as(step: str, candidate: str) -> Iterator[None]:
    """Any error inside is `StepFailed` at ``step`` for ``candidate``."""
    try:
        yield
    except Exception as err:
        raise StepFailed(step, candidate, err) from err


class KitchenFailedError(RuntimeError):
    """The kitchen stopped; the message names the step, the candidate, where its work is kept and what to do."""


def kitchen_fingerprint(config: PipelineConfig, ingredients: dict[str, str]) -> str:
    """What decides a kitchen's results: every setting but the sweep's and the stores', the ingredient versions
    with their sha256, and the code. Two kitchens with one fingerprint cook the same candidates."""
    settings = config.model_dump(mode="json", exclude={"sweep", "space", "tracking", "pretrain"})
    code = {"version": metadata.version("model-soups"), "commit": git_commit()}
    payload = {"study": config.study_name, "settings": settings, "ingredients": ingredients, "code": code}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def resumable_kitchen(client: MlflowClient, experiment_id: str, fingerprint: str) -> str | None:
    """The newest FAILED kitchen run with this fingerprint: the one to go on with, or None."""
    runs = client.search_runs(
        [experiment_id],
        f"tags.kind = 'kitchen' AND tags.`{FINGERPRINT_TAG}` = '{fingerprint}' AND attributes.status = 'FAILED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


@contextmanager
def failures_kept(client: MlflowClient, run_id: str, workdir: Path, command: str) -> Iterator[None]:
    """Any failure inside becomes one `KitchenFailedError` line: the step, the candidate, where the cooked work
    and the traceback are kept, and the command that goes on from there. The traceback goes to
    ``<workdir>/failure.txt`` and the run's ``failure`` artifacts; the step to the run's ``failed_step`` tag."""
    try:
        yield
    except Exception as err:
        step = getattr(err, "step", "kitchen")
        log = Path(workdir) / "failure.txt"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("".join(traceback.format_exception(err)))
        try:
            client.set_tag(run_id, "failed_step", step)
            client.log_artifact(run_id, str(log), "failure")
        except Exception as unlogged:  # noqa: BLE001 - the store may be what failed; the file is kept anyway
            print(f"could not record the failure in MLflow ({type(unlogged).__name__}); it is in {log}")
        what = str(err) if isinstance(err, StepFailed) else f"{step} failed: {type(err).__name__}: {err}"
        raise KitchenFailedError(
            f"{' '.join(what.split()).rstrip('.')}. What was cooked is kept in {workdir} (traceback: {log}); fix the "
            f"cause and run `{command}` again with the same config: it goes on from there without cooking again"
        ) from err
