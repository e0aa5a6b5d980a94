"""Keep every test's files inside pytest's temporary folders, never in the user's home."""

from __future__ import annotations

import os
import tempfile

_HOME = tempfile.mkdtemp(prefix="soups-tests-home-")
os.environ.__setitem__("PREFECT_HOME", os.path.join(_HOME, "prefect"))
os.environ.__setitem__("MPLCONFIGDIR", os.path.join(_HOME, "matplotlib"))
os.environ.__setitem__("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def pretrained_checkpoint(tmp_path_factory) -> Path:
    """The offline pretrained start (short contrastive pretraining on digits), made once per test session."""
    from soups.config import DataConfig
    from soups.data import load_dataset
    from soups.pretrain import PretrainConfig, pretrain_with

    out = tmp_path_factory.mktemp("pretrained") / "soups-vit-tiny-digits.safetensors"
    result = pretrain_with(PretrainConfig(), "soups-vit-tiny", load_dataset(DataConfig()), out)
    assert result.zero_shot_accuracy > 0.3, f"pretraining failed to get above chance: {result.zero_shot_accuracy}"
    return result.checkpoint


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server for the whole test session (it takes ~20 s to start)."""
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
