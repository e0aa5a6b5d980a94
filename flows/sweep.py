"""The sweep flow: an Optuna study (ask-and-tell) whose trials run ``parallel`` at a time, as tasks of this
process or as flow runs on a work pool (``sweep.dispatch``, flows/dispatch.py)."""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState
from prefect import flow
from prefect.artifacts import create_link_artifact, create_progress_artifact, update_progress_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from flows.dispatch import DeployedTrials, LocalTrials, Trials
from soups.config import PipelineConfig
from soups.pretrain import with_resolved_start
from soups.runtime import resolve_device
from soups.train import prepare_finetune
from tasks.adapters.reaping import Reaper, process_tags, reap_ghosts, retry_lost
from tasks.adapters.starts import publish_start
from tasks.adapters.studies import TrialHeartbeats, open_study, sample_params
from tasks.adapters.tracking import client_for, ensure_experiment, log_context, run_url, tracked_run
from tasks.context import crash_flow_runs, run_context
from tasks.trial import TrialOutcome, TrialRef, fail_trial


@flow(
    name="sweep",
    flow_run_name="sweep-{config.study_name}-{config.sweep.n_trials}",
    log_prints=True,
    task_runner=ThreadPoolTaskRunner(max_workers=16),
)
def sweep_flow(config: PipelineConfig, experiment_id: str | None = None) -> dict:
    """Run ``sweep.n_trials`` more trials of the study, plus a retry of each lost trial it finds; returns what
    finished, failed and was pruned. Some failed trials are fine; none finished raises `NoTrialFinishedError`
    (the flow run fails). It reaps what killed sweeps left behind (see `reap_ghosts`) first and every half
    heartbeat. Trials run where ``sweep.dispatch`` says (flows/dispatch.py).
    ``experiment_id``: the experiment the command that starts this flow ensured (a deployed run ensures it here)."""
    config = with_resolved_start(config)
    experiment_id = experiment_id or ensure_experiment(config)
    study = open_study(config)
    client = client_for(config.tracking)
    reaped = reap_ghosts(config, study, client, experiment_id)
    crash_flow_runs(reaped.flow_runs)
    retry_lost(study, client, set(reaped.trials))
    tags = {"kind": "sweep", "study": config.study_name, **process_tags(), **run_context("flows/sweep.py:sweep_flow")}
    with tracked_run(client, experiment_id, f"sweep-{config.study_name}", tags) as parent_run_id:
        log_context(client, parent_run_id, config)
        create_link_artifact(run_url(config.tracking, client, parent_run_id), f"MLflow run sweep-{config.study_name}")
        reaper = Reaper(config, study, client, experiment_id, parent_run_id, crash_flow_runs)
        with TrialHeartbeats(study) as heartbeats, reaper:
            if config.sweep.dispatch == "deployment":
                config = _portable(config, client, experiment_id)
                trials: Trials = DeployedTrials(config, study, client)
            else:
                inputs = prepare_finetune(config.finetune_config(), resolve_device(config.train.device))
                trials = LocalTrials(config, study, inputs, heartbeats)
            outcomes, failures = _run_trials(config, study, experiment_id, parent_run_id, trials, reaper, client)
        _log_summary(client, parent_run_id, outcomes, failures)
        if not outcomes:
            raise NoTrialFinishedError(_nothing_finished(config, failures))
    return {
        "parent_run_id": parent_run_id,
        "finished": [o.model_dump(mode="json") for o in outcomes],
        "failed": failures,
    }


def _portable(config: PipelineConfig, client, experiment_id: str) -> PipelineConfig:
    """The config a trial on another machine needs: the start as a registry URI, absolute local paths."""
    config = publish_start(config, client, experiment_id)
    tracking = config.tracking.model_copy(update={"root": config.tracking.root.resolve()})
    return config.model_copy(update={"tracking": tracking})


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
    trials: Trials,
    reaper: Reaper,
    client,
) -> tuple[list[TrialOutcome], dict[int, str]]:
    """Ask, start up to ``parallel`` trials, record each as it ends. A trial lost with its process (this sweep's,
    found by `wait`, or any sweep's, found by the reaper) is asked again once with the same parameters and
    resumes from its last training state, so a lost worker does not shrink the sweep. Retries waiting in the
    study when it starts (a killed sweep's, or `soups reap`'s) are run on top of ``n_trials``."""
    progress = create_progress_artifact(0.0, description=f"trials of study {config.study_name}")
    outcomes: list[TrialOutcome] = []
    failures: dict[int, str] = {}
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    wanted, asked = config.sweep.n_trials + sum("retry_of" in t.user_attrs for t in waiting), 0
    try:
        while asked < wanted or len(trials):
            while asked < wanted and len(trials) < trials.capacity:
                trial = study.ask()
                trial.set_user_attr("sweep_run_id", parent_run_id)
                # Each trial gets its own seed (init order, augmentation, mixup) unless the space samples it.
                seed = trial.user_attrs.get("seed", config.train.seed + trial.number)  # a retry keeps its seed
                params = {"seed": seed, **sample_params(trial, config.space)}
                trial.set_user_attr("seed", params["seed"])
                ref = TrialRef(
                    study_name=config.study_name,
                    trial_id=trial._trial_id,
                    number=trial.number,
                    experiment_id=experiment_id,
                    parent_run_id=parent_run_id,
                    resume_run_id=trial.user_attrs.get("resume_run_id"),
                )
                try:
                    trials.start(trial, ref, params)
                except BaseException as err:  # never leave an asked trial RUNNING without anyone to end it
                    fail_trial(trial, err)
                    raise
                asked += 1
            trial, wall_seconds = trials.wait()
            ended = study._storage.get_trial(trial._trial_id)
            _record(ended, wall_seconds, outcomes, failures)
            wanted += len(retry_lost(study, client, reaper.take() | {ended.number}))
            done = len(outcomes) + len(failures)
            update_progress_artifact(progress, 100.0 * done / wanted)
            print(f"trials done {done}/{wanted} ({len(failures)} failed or pruned)")
    finally:
        trials.abandon()
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


def _record(trial: FrozenTrial, wall_seconds: float, outcomes: list[TrialOutcome], failures: dict[int, str]) -> None:
    """Note how the trial ended; overhead = trial wall time seen by the sweep minus time inside finetune()."""
    if trial.state == TrialState.COMPLETE:
        outcome = TrialOutcome.of(trial)
        overhead = wall_seconds - outcome.train_function_seconds
        outcomes.append(outcome.model_copy(update={"orchestration_seconds": overhead}))
        print(
            f"trial {trial.number}: held-out accuracy {outcome.value:.4f}, registered as version "
            f"{outcome.version} (orchestration overhead {overhead:.2f}s)"
        )
        return
    reason = trial.user_attrs.get("fail_reason", "pruned" if trial.state == TrialState.PRUNED else "no reason")
    failures[trial.number] = f"{trial.state.name}: {reason}"
    print(f"trial {trial.number} did not finish: {failures[trial.number]}")
