"""A fine-tune killed between epochs resumes from its training state and ends where the uninterrupted run ends:
a real SIGKILL of a real process, the state read back in another one."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from soups.checkpoint import CheckpointError, load_state_dict, save_state_dict
from soups.config import FinetuneConfig
from soups.train import finetune, prepare_finetune
from soups.training_state import load_training_state

EPOCHS, KILLED_AFTER = 4, 2
# Every generator a run draws from: augmentation in workers, mixup in the training process, the epoch order.
TRAIN = {
    "epochs": EPOCHS,
    "lr": 3e-4,
    "seed": 7,
    "threads": 1,
    "workers": 1,
    "randaugment_n": 1,
    "randaugment_m": 9,
    "mixup_alpha": 0.4,
    "label_smoothing": 0.1,
    "checkpoint_every": 1,
}

KILLED_RUN = """
import os, signal, sys
from pathlib import Path
from soups.config import FinetuneConfig
from soups.train import finetune, prepare_finetune
from soups.training_state import save_training_state

config = FinetuneConfig.model_validate_json(sys.argv[1])
folder = Path(sys.argv[2])

def keep(state):
    save_training_state(state, folder / "state.safetensors")
    print(f"epoch {state.epoch}", flush=True)
    if state.epoch == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)

finetune(config, prepare_finetune(config), folder / "never.safetensors", on_state=keep)
"""


def _config(pretrained: Path) -> FinetuneConfig:
    return FinetuneConfig.model_validate({"model": {"pretrained": str(pretrained)}, "train": TRAIN})


def test_a_killed_fine_tune_resumed_ends_with_the_uninterrupted_weights_and_trains_only_the_rest(
    pretrained_checkpoint, tmp_path
):
    config = _config(pretrained_checkpoint)
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, config.model_dump_json(), str(tmp_path), str(KILLED_AFTER)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert killed.stdout.split() == ["epoch", "1", "epoch", "2"]
    assert not (tmp_path / "never.safetensors").exists()

    state = load_training_state(tmp_path / "state.safetensors")
    assert (state.epoch, len(state.history)) == (KILLED_AFTER, KILLED_AFTER)
    inputs = prepare_finetune(config)
    heard: list[int] = []
    resumed = finetune(config, inputs, tmp_path / "resumed.safetensors", lambda r: heard.append(r.epoch), resume=state)
    whole = finetune(config, inputs, tmp_path / "whole.safetensors")

    assert heard == [3, 4], "the resumed run trains only the epochs after the state"
    assert resumed.metrics["epochs_trained"] == EPOCHS - KILLED_AFTER and whole.metrics["epochs_trained"] == EPOCHS
    assert resumed.metrics["resumed_after_epoch"] == KILLED_AFTER
    a, b = load_state_dict(resumed.checkpoint), load_state_dict(whole.checkpoint)
    assert a.keys() == b.keys()
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) <= 1e-6
    assert resumed.metrics["heldout_accuracy"] == whole.metrics["heldout_accuracy"]
    assert resumed.metrics["heldout_loss"] == pytest.approx(whole.metrics["heldout_loss"], abs=1e-6)
    assert [r.epoch for r in resumed.history] == [1, 2, 3, 4], "the curves go on from the lost run's"
    assert resumed.history[:2] == whole.history[:2]


def test_a_state_of_another_config_or_not_a_state_is_refused(pretrained_checkpoint, tmp_path):
    config = _config(pretrained_checkpoint)
    states = []
    short = config.model_copy(update={"train": config.train.model_copy(update={"epochs": 2})})
    finetune(short, prepare_finetune(short), tmp_path / "a.safetensors", on_state=states.append)
    assert [s.epoch for s in states] == [1], "no state after the last epoch: the model itself is kept then"
    other = config.model_copy(update={"train": config.train.model_copy(update={"lr": 1e-4, "epochs": 2})})
    with pytest.raises(ValueError, match="another config"):
        finetune(other, prepare_finetune(other), tmp_path / "b.safetensors", resume=states[0])
    plain = save_state_dict({"w": torch.zeros(2)}, tmp_path / "plain.safetensors", {"x": json.dumps(1)})
    with pytest.raises(CheckpointError, match="not a training state"):
        load_training_state(plain)
