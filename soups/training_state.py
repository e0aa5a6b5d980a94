"""A fine-tune's state between two epochs, so a trial lost with its machine resumes where it stopped.

Everything the next epoch depends on is kept: the weights, AdamW's moments, the schedule's position, the
training process's generators (torch's, CUDA's, mixup's) and what was measured so far. The data pipeline needs
nothing: an epoch's order and augmentations are a function of (seed, epoch) (`soups.train_input`). A resumed run
therefore ends with the weights an uninterrupted one would have.

On disk it is one safetensors file (tensors by name, the rest as JSON in the metadata): nothing is unpickled
when a checkpoint comes back from an artifact store.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from soups.checkpoint import CheckpointError, load_state_dict, save_state_dict

FORMAT = "soups-training-state-1"


@dataclass(frozen=True)
class EpochReport:
    epoch: int
    train_loss: float
    heldout_accuracy: float
    heldout_loss: float


@dataclass
class TrainingState:
    """A run after ``epoch`` of its epochs (``step`` optimiser steps), made with the FinetuneConfig ``config``."""

    config: str
    epoch: int
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    schedule: dict[str, Any]
    generators: dict[str, Any]
    """'torch' (CPU state), 'cuda' (one state per device), 'mixup' (numpy bit generator state)."""
    history: list[EpochReport] = field(default_factory=list)
    start_metrics: dict[str, float] = field(default_factory=dict)
    """What was measured before the first epoch (start and zero-shot held-out accuracy, the probe's figures)."""

    @property
    def best_heldout_accuracy(self) -> float:
        return max(report.heldout_accuracy for report in self.history)


def save_training_state(state: TrainingState, path: Path) -> Path:
    """Write atomically (a temporary name, then rename): a reader never sees half a state."""
    tensors = {f"model.{key}": value for key, value in state.model.items()}
    optimizer_state: dict[str, dict[str, Any]] = {}
    for index, values in state.optimizer["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value
            else:
                optimizer_state.setdefault(str(index), {})[name] = value
    tensors["generators.torch"] = state.generators["torch"]
    for index, value in enumerate(state.generators["cuda"]):
        tensors[f"generators.cuda.{index}"] = value
    record = {
        "format": FORMAT,
        "config": state.config,
        "epoch": state.epoch,
        "step": state.step,
        "optimizer_groups": state.optimizer["param_groups"],
        "optimizer_values": optimizer_state,
        "schedule": state.schedule,
        "mixup": state.generators["mixup"],
        "history": [asdict(report) for report in state.history],
        "start_metrics": state.start_metrics,
        "best_heldout_accuracy": state.best_heldout_accuracy,
    }
    return save_state_dict(tensors, path, {"training_state": json.dumps(record)})


def load_training_state(path: Path) -> TrainingState:
    """Read a state `save_training_state` wrote; anything else is a `CheckpointError` naming the file."""
    from safetensors import safe_open

    tensors = load_state_dict(path)  # validates the header first
    with safe_open(str(path), "pt") as handle:
        record = json.loads((handle.metadata() or {}).get("training_state") or "null")
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a training state of this version ({FORMAT}); start the trial afresh")
    optimizer: dict[int, dict[str, Any]] = {}
    for index, values in record["optimizer_values"].items():
        optimizer.setdefault(int(index), {}).update(values)
    cuda: dict[int, torch.Tensor] = {}
    model: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        kind, _, rest = key.partition(".")
        if kind == "model":
            model[rest] = value
        elif kind == "optimizer":
            index, _, name = rest.partition(".")
            optimizer.setdefault(int(index), {})[name] = value
        elif rest.startswith("cuda."):
            cuda[int(rest.removeprefix("cuda."))] = value
    return TrainingState(
        config=record["config"],
        epoch=record["epoch"],
        step=record["step"],
        model=model,
        optimizer={"state": optimizer, "param_groups": record["optimizer_groups"]},
        schedule=record["schedule"],
        generators={
            "torch": tensors["generators.torch"],
            "cuda": [cuda[i] for i in sorted(cuda)],
            "mixup": record["mixup"],
        },
        history=[EpochReport(**report) for report in record["history"]],
        start_metrics=record["start_metrics"],
    )
