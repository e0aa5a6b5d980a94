"""The sweep flow: an Optuna study (ask-and-tell) whose trials are Prefect tasks, ``parallel`` at a time."""

from __future__ import annotations

import time

import optuna
from optuna.trial import TrialState
from prefect import flow
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from soups.config import PipelineConfig
from soups.pretrain import with_resolved_start
from soups.runtime import available_cores, resolve_device
from soups.train import FinetuneInputs, prepare_finetune
from tasks.adapters.reaping import reap_ghosts
from tasks.adapters.studies import TrialHeartbeats, open_study, sample_params
from tasks.adapters.tracking import client_for, ensure_experiment, log_context, tracked_run
from tasks.context import run_context
from tasks.trial import TrialOutcome, TrialRef, train_ingredient


@flow(
    name="sweep",
    flow_run_name="sweep-{config.study_name}-{config.sweep.n_trials}",
    log_prints=True,
    task_runner=ThreadPoolTaskRunner(max_workers=16),
)
def sweep_flow(config: PipelineConfig) -> dict:
    """Run ``sweep.n_trials`` more trials of the study; returns what finished, failed and was pruned. Some
    failed trials are fine; none finished raises `NoTrialFinishedError` (the flow run fails). First it reaps
    what killed sweeps left behind (see `reap_ghosts`)."""
    config = with_resolved_start(config)
    experiment_id = ensure_experiment(config)
    study = open_study(config)
    client = client_for(config.tracking)
    reap_ghosts(config, study, client, experiment_id)
    inputs = prepare_finetune(config.finetune_config(), resolve_device(config.train.device))
    tags = {"kind": "sweep", "study": config.study_name, **run_context("flows/sweep.py:sweep_flow")}
    with tracked_run(client, experiment_id, f"sweep-{config.study_name}", tags) as parent_run_id:
        log_context(client, parent_run_id, config)
        with TrialHeartbeats(study) as heartbeats:
            outcomes, failures = _run_trials(config, study, experiment_id, parent_run_id, inputs, heartbeats)
        _log_summary(client, parent_run_id, outcomes, failures)
        if not outcomes:
            raise NoTrialFinishedError(_nothing_finished(config, failures))
    return {
        "parent_run_id": parent_run_id,
        "finished": [o.model_dump(mode="json") for o in outcomes],
        "failed": failures,
    }


class NoTrialFinishedError(RuntimeError):
    """Every trial of a sweep failed or was pruned: nothing was registered."""


def _nothing_finished(config: PipelineConfig, failures: dict[int, str]) -> str:
    number, reason = min(failures.items()) if failures else (None, "none ran")
    reason = " ".join(reason.split())
    reason = reason if len(reason) <= 300 else reason[:300] + " ..."
    return (
        f"none of the {config.sweep.n_trials} trials of study {config.study_name!r} finished, so nothing was "
        f"registered; trial {number}: {reason} (every trial's reason: the failure_reason tags of its MLflow runs)"
    )


def _run_trials(
    config: PipelineConfig,
    study: optuna.Study,
    experiment_id: str,
    parent_run_id: str,
    inputs: FinetuneInputs,
    heartbeats: TrialHeartbeats,
) -> tuple[list[TrialOutcome], dict[int, str]]:
    """Ask, submit up to ``parallel`` trial tasks, tell each as it ends; each running trial has a heartbeat.
    Trials still running when the flow is interrupted are told FAIL, so the study never keeps RUNNING ghosts
    (and when the process is killed outright, their heartbeats stop and the next sweep fails them)."""
    parallel = config.sweep.parallel
    threads = max(1, available_cores() // parallel)
    base = config.model_copy(update={"train": config.train.model_copy(update={"threads": threads})})
    checkpoint_dir = (config.tracking.root / "checkpoints").resolve()
    progress = create_progress_artifact(0.0, description=f"trials of study {config.study_name}")
    in_flight: dict[PrefectFuture, tuple[optuna.Trial, float]] = {}  # trial and when it was submitted
    outcomes: list[TrialOutcome] = []
    failures: dict[int, str] = {}
    asked = 0
    try:
        while asked < config.sweep.n_trials or in_flight:
            while asked < config.sweep.n_trials and len(in_flight) < parallel:
                trial = study.ask()
                heartbeats.add(trial)
                trial.set_user_attr("sweep_run_id", parent_run_id)
                # Each trial gets its own seed (init order, augmentation, mixup) unless the space samples it.
                params = {"seed": config.train.seed + trial.number, **sample_params(trial, config.space)}
                trial.set_user_attr("seed", params["seed"])
                ref = TrialRef(
                    study_name=config.study_name,
                    storage=config.tracking.resolved_optuna_storage(),
                    trial_id=trial._trial_id,
                    number=trial.number,
                    experiment_id=experiment_id,
                    parent_run_id=parent_run_id,
                    checkpoint_dir=checkpoint_dir,
                )
                in_flight[train_ingredient.submit(base, ref, params, inputs)] = (trial, time.perf_counter())
                asked += 1
            future = next(as_completed(list(in_flight)))
            trial, submitted = in_flight[future]
            _tell(study, trial, future, outcomes, failures, time.perf_counter() - submitted)
            del in_flight[future]  # only once told: an interrupted tell is retried as FAIL below
            heartbeats.remove(trial)
            done = len(outcomes) + len(failures)
            update_progress_artifact(progress, 100.0 * done / config.sweep.n_trials)
            print(f"trials done {done}/{config.sweep.n_trials} ({len(failures)} failed or pruned)")
    finally:
        for trial, _ in in_flight.values():
            study.tell(trial, state=TrialState.FAIL)
            heartbeats.remove(trial)
    return outcomes, failures


def _log_summary(client, run_id: str, outcomes: list[TrialOutcome], failures: dict[int, str]) -> None:
    client.log_metric(run_id, "finished_trials", len(outcomes))
    client.log_metric(run_id, "failed_trials", len(failures))
    if not outcomes:
        return
    client.log_metric(run_id, "best_heldout_accuracy", max(o.value for o in outcomes))
    overhead = sum(o.orchestration_seconds for o in outcomes) / len(outcomes)
    client.log_metric(run_id, "orchestration_seconds_per_trial", overhead)
    print(
        f"orchestration overhead per trial: mean {overhead:.2f}s "
        "(trial wall time in the flow minus time inside finetune())"
    )


def _tell(
    study: optuna.Study,
    trial: optuna.Trial,
    future: PrefectFuture,
    outcomes: list[TrialOutcome],
    failures: dict[int, str],
    wall_seconds: float,
) -> None:
    """Tell Optuna how the trial ended; overhead = trial wall time seen by the flow minus time in finetune()."""
    result = future.result(raise_on_failure=False)  # the outcome, or the exception the task raised
    if isinstance(result, TrialOutcome):
        outcome = result
        study.tell(trial, outcome.value)
        overhead = wall_seconds - outcome.train_function_seconds
        outcomes.append(outcome.model_copy(update={"orchestration_seconds": overhead}))
        print(
            f"trial {trial.number}: held-out accuracy {outcome.value:.4f}, registered as version "
            f"{outcome.version} (orchestration overhead {overhead:.2f}s)"
        )
        return
    error = result
    failures[trial.number] = f"{type(error).__name__}: {error}"
    if isinstance(error, optuna.TrialPruned):
        study.tell(trial, state=TrialState.PRUNED)
    else:
        trial.set_user_attr("fail_reason", failures[trial.number][:1000])
        study.tell(trial, state=TrialState.FAIL)
    print(f"trial {trial.number} did not finish: {failures[trial.number]}")
