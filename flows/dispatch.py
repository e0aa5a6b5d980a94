"""How a sweep runs its trials: as tasks of its own process (`LocalTrials`) or as flow runs of the ``trial``
deployment that any worker of the pool takes (`DeployedTrials`). Both start a trial with `start` and report
ended trials with `wait`; the trial itself (`tasks.trial.run_trial`) tells Optuna how it ended."""

from __future__ import annotations

import time
from typing import Any, Protocol

import optuna
from prefect.futures import PrefectFuture, as_completed

from soups.config import PipelineConfig
from soups.runtime import available_cores, trial_slots
from soups.train import FinetuneInputs
from tasks.adapters.studies import TrialHeartbeats, still_running
from tasks.adapters.tracking import fail_run
from tasks.context import crash_flow_runs
from tasks.trial import TrialRef, fail_trial, train_ingredient


class Trials(Protocol):
    capacity: int
    """How many trials may run at once."""

    def __len__(self) -> int: ...

    def start(self, trial: optuna.Trial, ref: TrialRef, params: dict[str, Any]) -> None: ...

    def wait(self) -> tuple[optuna.Trial, float]:
        """Block until a trial ends; the trial and the seconds since `start`."""
        ...

    def abandon(self) -> None:
        """The sweep is interrupted: settle what is still running."""
        ...


class LocalTrials:
    """Trials as tasks of this flow run, each on its own slot (its own GPU when there are GPUs), splitting the
    CPU cores between them. This process beats every trial's heartbeat."""

    def __init__(
        self, config: PipelineConfig, study: optuna.Study, inputs: FinetuneInputs, heartbeats: TrialHeartbeats
    ) -> None:
        self._slots = trial_slots(config.train.device, config.sweep.parallel)
        if len(self._slots) < config.sweep.parallel:
            print(f"running {len(self._slots)} trials at once, one per GPU ({config.sweep.parallel} asked)")
        self.capacity = len(self._slots)
        threads = max(1, available_cores() // self.capacity)
        self._config = config.model_copy(update={"train": config.train.model_copy(update={"threads": threads})})
        self._study, self._inputs, self._heartbeats = study, inputs, heartbeats
        self._free = list(range(self.capacity))  # slots without a trial
        self._running: dict[PrefectFuture, tuple[optuna.Trial, int, float]] = {}  # trial, slot, when started

    def __len__(self) -> int:
        return len(self._running)

    def start(self, trial: optuna.Trial, ref: TrialRef, params: dict[str, Any]) -> None:
        slot = self._free.pop(0)
        self._heartbeats.add(trial)
        train = self._config.train.model_copy(update={"device": self._slots[slot]})
        config = self._config.model_copy(update={"train": train})
        future = train_ingredient.submit(config, ref, params, self._inputs)
        self._running[future] = (trial, slot, time.perf_counter())

    def wait(self) -> tuple[optuna.Trial, float]:
        future = next(as_completed(list(self._running)))
        trial, slot, started = self._running[future]
        error = future.result(raise_on_failure=False)
        if still_running(trial):  # the task failed before the trial could tell its end
            fail_trial(trial, error if isinstance(error, BaseException) else RuntimeError("the task ended early"))
        del self._running[future]  # only once told: an interrupted wait is settled by abandon()
        self._free.append(slot)
        self._heartbeats.remove(trial)
        return trial, time.perf_counter() - started

    def abandon(self) -> None:
        for trial, _, _ in self._running.values():
            fail_trial(trial, KeyboardInterrupt("the sweep was interrupted"))
            self._heartbeats.remove(trial)


class DeploymentMissingError(RuntimeError):
    """The ``trial`` deployment is not on the Prefect server the sweep talks to."""


class DeployedTrials:
    """Trials as flow runs of ``sweep.deployment``, children of the sweep's flow run; any worker of the pool
    takes them and their own process beats their heartbeat. A trial has ended when Optuna says so; one whose
    flow run ended without telling is failed here and its MLflow run closed; one the sweep's reaper failed (its
    heartbeat stopped: a lost worker) gets its flow run marked Crashed."""

    def __init__(self, config: PipelineConfig, study: optuna.Study, mlflow_client) -> None:
        from prefect.client.orchestration import get_client

        self.capacity = config.sweep.parallel
        self._config, self._study, self._mlflow = config, study, mlflow_client
        self._deployment = config.sweep.deployment
        self._running: dict[int, tuple[optuna.Trial, Any, float]] = {}  # number -> trial, flow run id, started
        self._waiting_noted: set[int] = set()
        self._prefect = get_client(sync_client=True)
        self._pool = self._check_deployment()

    def _check_deployment(self) -> str:
        from prefect.exceptions import ObjectNotFound
        from prefect.settings import PREFECT_API_URL

        try:
            deployment = self._prefect.read_deployment_by_name(self._deployment)
        except ObjectNotFound:
            raise DeploymentMissingError(
                f"sweep.dispatch is 'deployment' but the Prefect server at {PREFECT_API_URL.value()} has no "
                f"deployment {self._deployment!r}: `soups stack up` deploys it, or run `prefect deploy --name "
                "trial --prefect-file deployments/prefect.yaml` there (or set sweep.dispatch: local)"
            ) from None
        return deployment.work_pool_name or "?"

    def __len__(self) -> int:
        return len(self._running)

    def start(self, trial: optuna.Trial, ref: TrialRef, params: dict[str, Any]) -> None:
        from prefect.deployments import run_deployment

        flow_run = run_deployment(
            self._deployment,
            parameters={
                "config": self._config.model_dump(mode="json", by_alias=True),
                "ref": ref.model_dump(),
                "params": params,
            },
            flow_run_name=f"trial-{ref.study_name}-{ref.number}",
            timeout=0,  # returns at once; `wait` follows it
            tags=[f"study:{ref.study_name}"],
        )
        trial.set_user_attr("prefect_flow_run_id", str(flow_run.id))
        self._running[trial.number] = (trial, flow_run.id, time.perf_counter())

    def wait(self) -> tuple[optuna.Trial, float]:
        while True:
            for number, (trial, flow_run_id, started) in list(self._running.items()):
                if self._ended(trial, flow_run_id, started):
                    del self._running[number]
                    return trial, time.perf_counter() - started
            time.sleep(self._config.sweep.poll_seconds)

    def _ended(self, trial: optuna.Trial, flow_run_id, started: float) -> bool:
        told = self._study._storage.get_trial(trial._trial_id)
        if told.state != optuna.trial.TrialState.RUNNING:
            reason = str(told.user_attrs.get("fail_reason", ""))
            if reason.startswith("process died"):  # the reaper found its process gone: so is its flow run
                crash_flow_runs({str(flow_run_id): reason})
            return True
        state = self._prefect.read_flow_run(flow_run_id).state
        if state is None or not state.is_final():
            waiting = state is not None and state.is_scheduled() and time.perf_counter() - started > 60
            if waiting and trial.number not in self._waiting_noted:
                self._waiting_noted.add(trial.number)
                print(f"trial {trial.number} waits for a worker of pool {self._pool!r} (flow run {state.name})")
            return False
        if still_running(trial):  # the flow run ended without telling (it crashed, or was cancelled)
            message = " ".join((state.message or "no message").split())[:300]
            fail_trial(trial, RuntimeError(f"its flow run ended {state.name}: {message}"))
            self._close_run(trial, f"its flow run ended {state.name}")
        return True

    def _close_run(self, trial: optuna.Trial, reason: str) -> None:
        run_id = self._study._storage.get_trial(trial._trial_id).user_attrs.get("mlflow_run_id")
        if run_id and self._mlflow.get_run(run_id).info.status == "RUNNING":
            fail_run(self._mlflow, run_id, reason)

    def abandon(self) -> None:
        if self._running:
            numbers = ", ".join(str(n) for n in sorted(self._running))
            print(f"sweep interrupted: trials {numbers} go on as flow runs and tell the study their end themselves")
