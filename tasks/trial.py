"""The sweep's unit of work: fine-tune one ingredient, track it in MLflow, register it, report to Optuna.

Inputs are plain ids and the config plus the `FinetuneInputs` of the process that runs it, so a trial runs
the same as a task of the sweep (``sweep.dispatch: local``) or as its own flow run on any worker
(``deployment``, flows/trial.py): it reopens its Optuna trial from (storage, study, trial id), talks to MLflow
through explicit run ids, and tells Optuna its end itself.
"""

from __future__ import annotations

import shutil
import time
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from soups.checkpoint import file_sha256
from soups.config import PipelineConfig
from soups.serving import ClassifierSpec
from soups.train import EpochReport, FinetuneInputs
from tasks.adapters.packaging import MODEL_WEIGHTS, log_classifier_model
from tasks.adapters.studies import open_trial, still_running
from tasks.adapters.tracking import (
    PARENT_RUN_TAG,
    client_for,
    flat_params,
    log_dataset_input,
    log_params,
    register_ingredient,
    tracked_run,
)
from tasks.adapters.training_states import delete_states, latest_state, state_uploader
from tasks.context import run_context

EPOCH_METRICS = ("train_loss", "heldout_accuracy", "heldout_loss")
"""Logged after every epoch, at step = epoch."""


class TrialRef(BaseModel):
    """Which trial this is and where its run belongs: plain ids, so any process can pick it up."""

    study_name: str
    trial_id: int
    number: int
    experiment_id: str
    parent_run_id: str
    resume_run_id: str | None = None
    """A retry's lost run: training resumes from that run's last training state (tasks/adapters/training_states.py)."""


class TrialOutcome(BaseModel):
    """A finished trial as the study records it (user attrs written by `run_trial` before it tells)."""

    number: int
    value: float
    run_id: str
    version: str
    train_function_seconds: float
    orchestration_seconds: float | None = None

    @classmethod
    def of(cls, trial: FrozenTrial) -> TrialOutcome:
        attrs = trial.user_attrs
        return cls(
            number=trial.number,
            value=trial.value,
            run_id=attrs["mlflow_run_id"],
            version=attrs["model_version"],
            train_function_seconds=attrs["train_function_seconds"],
        )


@task(name="train-ingredient", task_run_name="trial-{ref.number}", retries=0, cache_policy=NO_CACHE)
def train_ingredient(config: PipelineConfig, ref: TrialRef, params: dict[str, Any], inputs: FinetuneInputs) -> None:
    """One trial as a task of the sweep's process (``sweep.dispatch: local``)."""
    run_trial(config, ref, params, inputs)


def run_trial(config: PipelineConfig, ref: TrialRef, params: dict[str, Any], inputs: FinetuneInputs) -> None:
    """The one trial function of both dispatches: fine-tune with the sampled params in an MLflow run, register
    the ingredient, and tell the Optuna trial how it ended (COMPLETE with its outcome in user attrs, PRUNED, or
    FAIL with a ``fail_reason``), so a sweep that dies meanwhile loses nothing. A failure marks the run failed,
    registers nothing and re-raises."""
    client = client_for(config.tracking)
    trial = open_trial(config.tracking.resolved_optuna_storage(), ref.study_name, ref.trial_id, config.sweep.pruning)
    tags = {
        PARENT_RUN_TAG: ref.parent_run_id,
        "kind": "ingredient",
        "study": ref.study_name,
        "trial_number": str(ref.number),
        **run_context("tasks/trial.py:run_trial"),
    }
    try:
        with tracked_run(
            client, ref.experiment_id, f"trial-{ref.number}", tags, killed_by=(optuna.TrialPruned,)
        ) as run_id:
            trial.set_user_attr("mlflow_run_id", run_id)  # so a sweep can close this run if the process dies
            value, version, seconds = _train_and_register(client, run_id, config, ref, trial, params, inputs)
    except optuna.TrialPruned:
        _tell_unless_ended(trial, TrialState.PRUNED)
        raise
    except BaseException as err:
        fail_trial(trial, err)
        raise
    trial.set_user_attr("model_version", version)
    trial.set_user_attr("train_function_seconds", seconds)
    trial.study.tell(trial, value)


def fail_trial(trial: optuna.Trial, err: BaseException) -> None:
    """Tell FAIL with the error as the trial's ``fail_reason`` (unless a sweep already ended it)."""
    if still_running(trial):
        trial.set_user_attr("fail_reason", f"{type(err).__name__}: {err}"[:1000])
    _tell_unless_ended(trial, TrialState.FAIL)


def _tell_unless_ended(trial: optuna.Trial, state: TrialState) -> None:
    """Tell a trial's end unless a sweep already told one (e.g. it was interrupted, or found it stale)."""
    if still_running(trial):
        trial.study.tell(trial, state=state)


def _train_and_register(
    client, run_id: str, config: PipelineConfig, ref: TrialRef, trial: optuna.Trial, params: dict[str, Any], inputs
) -> tuple[float, str, float]:
    """(held-out accuracy, registered version, seconds inside finetune()). The checkpoint is written on this
    machine, packaged as a pyfunc model like the soups (logged model ``trial-<n>``, loadable from the
    registry), uploaded and deleted: the artifact store keeps the only copy."""
    from soups.train import finetune

    finetune_config = config.finetune_config(params)
    flat = {**flat_params(finetune_config.model_dump(mode="json")), **flat_params(params, "sampled.")}
    log_params(client, run_id, flat)
    log_dataset_input(client, run_id, config, "train", inputs.train.labels, "training")
    staging = config.tracking.checkpoint_dir()
    staging.mkdir(parents=True, exist_ok=True)
    checkpoint = staging / f"{ref.study_name}-trial-{ref.number}.safetensors"
    try:
        resume = _resumed_state(client, run_id, ref, trial, finetune_config, staging)
        train_started = time.perf_counter()
        result = finetune(
            finetune_config,
            inputs,
            checkpoint,
            on_epoch=_epoch_reporter(client, run_id, trial, ref, config, finetune_config.train.epochs),
            on_state=state_uploader(client, run_id, staging) if finetune_config.train.checkpoint_every else None,
            resume=resume,
        )
    except BaseException:
        delete_states(client, run_id)  # a trial failed (or pruned) in its own process is never resumed
        raise
    train_seconds = time.perf_counter() - train_started
    log_params(client, run_id, flat_params(result.runtime, "runtime."))
    for key, value in result.metrics.items():
        if key not in EPOCH_METRICS:  # those are curves already, ending at the last epoch: no step-0 repeat
            client.log_metric(run_id, key, value, step=finetune_config.train.epochs)
    package = checkpoint.with_suffix("")
    try:
        digest = file_sha256(checkpoint)
        spec = ClassifierSpec(config.model.name, list(inputs.classnames), inputs.preprocess)
        source, model_id = log_classifier_model(client, run_id, checkpoint, spec, package, f"trial-{ref.number}")
    finally:
        checkpoint.unlink(missing_ok=True)
        shutil.rmtree(package, ignore_errors=True)
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
        source,
        MODEL_WEIGHTS,
        digest,
        tags,
        description=(
            f"Trial {ref.number} of study {ref.study_name}: {config.model.name} fine-tuned with "
            + ", ".join(f"{k}={v}" for k, v in params.items())
            + f"; held-out accuracy {result.metrics['heldout_accuracy']:.4f} on the whole held-out split."
        ),
        model_id=model_id,
    )
    for states_of in (run_id, ref.resume_run_id):
        if states_of:
            delete_states(client, states_of)
    return result.metrics["heldout_accuracy"], str(version.version), train_seconds


def _resumed_state(client, run_id: str, ref: TrialRef, trial, finetune_config, staging):
    """A retry's start: its lost run's last training state, its curves continued in this run and its reports in
    Optuna, both runs tagged with the link. None (train from the start) when the lost run saved no usable state."""
    if ref.resume_run_id is None:
        return None
    state = latest_state(client, ref.resume_run_id, staging)
    if state is None or state.config != finetune_config.model_dump_json():
        why = "saved no training state" if state is None else "saved a state of another config"
        print(f"trial {ref.number}: the lost run {ref.resume_run_id} {why}; training from the first epoch")
        return None
    client.set_tag(run_id, "resumed_from_run", ref.resume_run_id)
    client.set_tag(run_id, "resumed_after_epoch", str(state.epoch))
    client.set_tag(ref.resume_run_id, "resumed_by_run", run_id)
    for report in state.history:
        for key in EPOCH_METRICS:
            client.log_metric(run_id, key, getattr(report, key), step=report.epoch)
        trial.report(report.heldout_accuracy, report.epoch)
    epochs = finetune_config.train.epochs
    print(f"trial {ref.number}: resuming the lost run {ref.resume_run_id} after epoch {state.epoch}/{epochs}")
    return state


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
