"""The sweep's unit of work: fine-tune one ingredient, track it in MLflow, register it, report to Optuna.

Inputs are plain ids, configs and paths plus the shared `FinetuneInputs` of this process, so a trial can
later run as its own flow run on another machine: the task reopens the Optuna trial from (storage, study,
trial id) and talks to MLflow through explicit run ids.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import optuna
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from soups.config import PipelineConfig
from soups.train import EpochReport, FinetuneInputs
from tasks.adapters.studies import open_trial, still_running
from tasks.adapters.tracking import (
    CHECKPOINT_ARTIFACT,
    PARENT_RUN_TAG,
    client_for,
    flat_params,
    log_params,
    register_ingredient,
    sha256_of,
    tracked_run,
)
from tasks.context import run_context

EPOCH_METRICS = ("train_loss", "heldout_accuracy", "heldout_loss")
"""Logged after every epoch, at step = epoch."""


class TrialRef(BaseModel):
    """Where a trial lives and where its outputs go."""

    study_name: str
    storage: str
    trial_id: int
    number: int
    experiment_id: str
    parent_run_id: str
    checkpoint_dir: Path


class TrialOutcome(BaseModel):
    number: int
    value: float
    run_id: str
    version: str
    checkpoint: Path
    train_function_seconds: float
    orchestration_seconds: float | None = None


@task(name="train-ingredient", task_run_name="trial-{ref.number}", retries=0, cache_policy=NO_CACHE)
def train_ingredient(
    config: PipelineConfig, ref: TrialRef, params: dict[str, Any], inputs: FinetuneInputs
) -> TrialOutcome:
    """Fine-tune with the sampled params; a failure marks the MLflow run failed, registers nothing, re-raises."""
    client = client_for(config.tracking)
    tags = {
        PARENT_RUN_TAG: ref.parent_run_id,
        "kind": "ingredient",
        "study": ref.study_name,
        "trial_number": str(ref.number),
        **run_context("tasks/trial.py:train_ingredient"),
    }
    with tracked_run(client, ref.experiment_id, f"trial-{ref.number}", tags, killed_by=(optuna.TrialPruned,)) as run_id:
        return _train_and_register(client, run_id, config, ref, params, inputs)


def _train_and_register(
    client, run_id: str, config: PipelineConfig, ref: TrialRef, params: dict[str, Any], inputs: FinetuneInputs
) -> TrialOutcome:
    from soups.train import finetune

    trial = open_trial(ref.storage, ref.study_name, ref.trial_id, config.sweep.pruning)
    trial.set_user_attr("mlflow_run_id", run_id)  # so the next sweep can close this run if the process dies
    finetune_config = config.finetune_config(params)
    flat = {**flat_params(finetune_config.model_dump(mode="json")), **flat_params(params, "sampled.")}
    log_params(client, run_id, flat)
    _log_dataset(client, run_id, config, inputs)
    checkpoint = ref.checkpoint_dir / f"{ref.study_name}-trial-{ref.number}.safetensors"
    train_started = time.perf_counter()
    result = finetune(
        finetune_config,
        inputs,
        checkpoint,
        on_epoch=_epoch_reporter(client, run_id, trial, ref, config, finetune_config.train.epochs),
    )
    train_seconds = time.perf_counter() - train_started
    for key, value in result.metrics.items():
        if key not in EPOCH_METRICS:  # those are curves already, ending at the last epoch: no step-0 repeat
            client.log_metric(run_id, key, value, step=finetune_config.train.epochs)
    client.log_artifact(run_id, str(checkpoint), CHECKPOINT_ARTIFACT)
    digest = sha256_of(checkpoint)
    if not still_running(trial):
        raise RuntimeError(f"trial {ref.number} was ended by the sweep while training; not registering it")
    tags = {
        "study": ref.study_name,
        "trial_number": str(ref.number),
        "heldout_accuracy": repr(result.metrics["heldout_accuracy"]),
    }
    version = register_ingredient(
        client,
        config,
        run_id,
        checkpoint,
        digest,
        tags,
        description=(
            f"Trial {ref.number} of study {ref.study_name}: {config.model.name} fine-tuned with "
            + ", ".join(f"{k}={v}" for k, v in params.items())
            + f"; held-out accuracy {result.metrics['heldout_accuracy']:.4f} on the whole held-out split."
        ),
    )
    return TrialOutcome(
        number=ref.number,
        value=result.metrics["heldout_accuracy"],
        run_id=run_id,
        version=str(version.version),
        checkpoint=checkpoint,
        train_function_seconds=train_seconds,
    )


def _epoch_reporter(client, run_id: str, trial, ref: TrialRef, config: PipelineConfig, epochs: int):
    """Per-epoch metrics to MLflow and Optuna, progress to the log, and pruning when enabled."""

    def report(epoch: EpochReport) -> None:
        for key in EPOCH_METRICS:
            client.log_metric(run_id, key, getattr(epoch, key), step=epoch.epoch)
        trial.report(epoch.heldout_accuracy, epoch.epoch)
        print(f"trial {ref.number}: epoch {epoch.epoch}/{epochs} held-out accuracy {epoch.heldout_accuracy:.3f}")
        if config.sweep.pruning and trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch.epoch}")

    return report


def _log_dataset(client, run_id: str, config: PipelineConfig, inputs: FinetuneInputs) -> None:
    """The training split as an MLflow dataset input (digest of its labels, source = how it was loaded)."""
    import mlflow
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.entities import DatasetInput, InputTag

    source = CodeDatasetSource({"dataset": config.data.model_dump_json()})
    dataset = mlflow.data.from_numpy(inputs.train.labels.numpy(), source=source, name=f"{config.data.name}-train")
    context = InputTag("mlflow.data.context", "train")
    client.log_inputs(run_id, [DatasetInput(dataset._to_mlflow_entity(), [context])])
