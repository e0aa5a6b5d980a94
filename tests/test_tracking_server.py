"""The platform against a real `mlflow server` process (what workers on other machines would use)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
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
        [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--default-artifact-root", (folder / "artifacts").as_uri(), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
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
    config = load_config(None, {
        "experiment": "served-soups",
        "tracking.root": str(tmp_path),
        "tracking.mlflow_uri": mlflow_server,
        "sweep.n_trials": 2,
        "space": {"lr": {"kind": "loguniform", "low": 3e-4, "high": 1e-3},
                  "epochs": {"kind": "int", "low": 1, "high": 1}},
        "kitchen.recipes": ["best", "uniform", "greedy"],
    })
    result = pipeline_flow(config)
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    assert len(client.search_model_versions("name='served-soups-ingredients'")) == 2
    champion = client.get_model_version_by_alias("served-soups", "champion")
    assert str(champion.version) == result["kitchen"]["promotion"]["candidate_version"]
    assert not (tmp_path / "mlflow.db").exists(), "nothing may bypass the server into a local database"
