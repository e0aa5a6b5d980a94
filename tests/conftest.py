"""Keep every test's files inside temporary folders, never in the user's home, and keep tests offline."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_HOME = tempfile.mkdtemp(prefix="soups-tests-home-")
for _variable, _folder in {
    "PREFECT_HOME": "prefect",
    "MPLCONFIGDIR": "matplotlib",
    "HF_HOME": "huggingface",
    "TORCH_HOME": "torch",
    "XDG_CACHE_HOME": "cache",
    "XDG_CONFIG_HOME": "config",
}.items():
    os.environ[_variable] = os.path.join(_HOME, _folder)
os.environ.update(
    HF_HUB_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false"
)
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests pass their own sqlite URIs, never a user's server
os.environ.pop("PREFECT_API_URL", None)  # and use the harness's temporary Prefect server

# Prefect configures its console log handler once, on first import, bound to the sys.stderr of that moment.
# Import it now, under pytest's session-wide capture, so a test that first imports it inside `capsys` does not
# leave every later test logging into that test's closed stream.
import prefect.main  # noqa: E402, F401


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """The offline pretrained start (the default contrastive pretraining on digits), made once per test session."""
    from soups.config import DataConfig, PretrainConfig
    from soups.data import load_dataset
    from soups.pretrain import pretrain

    out = tmp_path_factory.mktemp("pretrained") / "soups-vit-tiny-digits.safetensors"
    return pretrain(PretrainConfig(), "soups-vit-tiny", load_dataset(DataConfig()), out)


@pytest.fixture(scope="session")
def pretrained_checkpoint(pretrained) -> Path:
    return pretrained.checkpoint


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server for the whole test session (it takes ~20 s to start)."""
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
