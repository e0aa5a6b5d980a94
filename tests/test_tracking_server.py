"""The platform against a real `mlflow server` process (what workers on other machines would use)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.pipeline import pipeline_flow
from soups.config import load_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    process = subprocess.Popen(
        [
            str(mlflow),
            "server",
            "--backend-store-uri",
            f"sqlite:///{folder / 'mlflow.db'}",
            "--default-artifact-root",
            (folder / "artifacts").as_uri(),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("mlflow server did not start") from None
                time.sleep(0.5)
        yield uri
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_pipeline_tracks_registers_and_promotes_through_a_tracking_server(prefect_server, mlflow_server, tmp_path):
    config = load_config(
        None,
        {
            "experiment": "served-soups",
            "tracking.root": str(tmp_path),
            "tracking.mlflow_uri": mlflow_server,
            "sweep.n_trials": 2,
            "kitchen.recipes": ["best", "uniform", "greedy"],
            "sweep.sampler": "random",
            "space": {
                "lr": {"kind": "loguniform", "low": 3e-4, "high": 1e-3},
                "epochs": {"kind": "int", "low": 2, "high": 2},
            },
        },
    )
    result = pipeline_flow(config)
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    assert len(client.search_model_versions("name='served-soups-ingredients'")) == 2
    champion = client.get_model_version_by_alias("served-soups", "champion")
    assert str(champion.version) == result["kitchen"]["promotion"]["candidate_version"]
    assert not (tmp_path / "mlflow.db").exists(), "nothing may bypass the server into a local database"
    _what_the_ui_shows(mlflow_server, result)


def _rest(server: str, path: str, **query) -> dict:
    """One call of the REST API the MLflow UI itself reads."""
    url = f"{server}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _what_the_ui_shows(server: str, result: dict) -> None:
    """Through the REST API: nested trial runs, per-epoch curves with distinct steps, the leaderboard artifact, the
    champion alias and the descriptions a registry reader sees."""
    sweep_run = result["sweep"]["parent_run_id"]
    experiment = _rest(server, "experiments/get-by-name", experiment_name="served-soups")["experiment"]
    search = urllib.request.Request(
        f"{server}/api/2.0/mlflow/runs/search",
        data=json.dumps(
            {
                "experiment_ids": [experiment["experiment_id"]],
                "filter": f"tags.`mlflow.parentRunId` = '{sweep_run}'",
            }
        ).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(search, timeout=30) as response:
        trials = json.loads(response.read())["runs"]
    assert len(trials) == 2, "the trials are nested under the sweep run"
    history = _rest(server, "metrics/get-history", run_id=trials[0]["info"]["run_id"], metric_key="heldout_accuracy")
    assert sorted(m["step"] for m in history["metrics"]) == [1, 2], "one point per epoch"
    files = _rest(server, "artifacts/list", run_id=result["kitchen"]["run_id"])["files"]
    assert {"leaderboard.csv", "report.md", "accuracy_vs_shift.png"} <= {f["path"] for f in files}
    champion = _rest(server, "registered-models/alias", name="served-soups", alias="champion")["model_version"]
    assert champion["version"] == result["kitchen"]["promotion"]["candidate_version"]
    assert (
        champion["description"]
        and _rest(server, "registered-models/get", name="served-soups")["registered_model"]["description"]
    )
