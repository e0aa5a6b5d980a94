"""What a run records about where it came from: the Prefect flow run that made it (id, name, UI address) and the
code (the entry point and git commit), as MLflow tags, so the MLflow UI links back to Prefect and to the code."""

from __future__ import annotations

import subprocess
from functools import cache
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]


def run_context(entry_point: str) -> dict[str, str]:
    """MLflow tags for a run made inside a flow run; empty values are left out, never tagged as ''."""
    from prefect.runtime import flow_run

    tags = {
        "prefect.flow_run_id": str(flow_run.id or ""),
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
