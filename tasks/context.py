"""What a run records about where it came from: the Prefect flow run that made it (id, name, UI address) and the
code (the entry point and git commit), as MLflow tags, so the MLflow UI links back to Prefect and to the code."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from mlflow import MlflowClient

from soups.config import PipelineConfig
from tasks.adapters.tracking import FLOW_RUN_TAG

CHECKOUT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class RunContext:
    """A stage's run, made once and taken by every task of the stage (the kitchen's after gathering, the
    promotion's): the config, the one MLflow client, the experiment and the stage's run, its work folder."""

    config: PipelineConfig
    client: MlflowClient
    experiment_id: str
    run_id: str
    workdir: Path
    resumed: bool = False
    """Whether this run failed before and was reopened (its context and parameters are logged already)."""


def run_context(entry_point: str) -> dict[str, str]:
    """MLflow tags for a run made inside a flow run; empty values are left out, never tagged as ''."""
    from prefect.runtime import flow_run

    tags = {
        FLOW_RUN_TAG: str(flow_run.id or ""),
        "prefect.flow_run_name": flow_run.name or "",
        "prefect.flow_run_url": flow_run.ui_url or "",
        "mlflow.source.type": "JOB",
        "mlflow.source.name": entry_point,
        "mlflow.source.git.commit": git_commit(),
    }
    return {key: value for key, value in tags.items() if value}


@cache
def git_commit() -> str:
    """The checkout's commit, or '' outside a git checkout (an installed copy)."""
    try:
        result = subprocess.run(
            ["git", "-C", str(CHECKOUT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout.strip()


def crash_flow_runs(dead: dict[str, str]) -> None:
    """Mark Crashed the flow runs (and their task runs) still RUNNING whose process is known dead (``dead``: id
    -> reason): Prefect does not notice a SIGKILLed process by itself, so they would stay Running forever.
    Flow runs this server does not know (another server's) are left alone."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        for flow_run_id, reason in dead.items():
            try:
                state = client.read_flow_run(flow_run_id).state
            except (ObjectNotFound, ValueError):
                continue
            if state is None or state.is_final():
                continue
            client.set_flow_run_state(flow_run_id, Crashed(message=reason), force=True)
            live = TaskRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING])
            running = TaskRunFilter(state=TaskRunFilterState(type=live))
            only = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            for task_run in client.read_task_runs(flow_run_filter=only, task_run_filter=running):
                client.set_task_run_state(task_run.id, Crashed(message=reason), force=True)
            print(f"Prefect flow run {flow_run_id} marked Crashed: {reason}")
