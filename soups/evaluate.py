"""Fast evaluation of many models on the same images.

A greedy soup scores dozens of candidates on one held-out set, and the kitchen scores every candidate on
held-out, test and every shift set. Each split is therefore decoded and resized once into a uint8 tensor
(4x smaller than float, cheap to move to a GPU) and normalised per batch on the device; candidates are
loaded into one existing module with ``load_state_dict`` rather than rebuilt.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset
from torchvision.transforms import v2

from soups.checkpoint import StateDict
from soups.config import DataConfig
from soups.data import DatasetBundle, load_dataset


@dataclass(frozen=True)
class Preprocess:
    """The model's eval preprocessing, split into a decode-once part and a per-batch normalisation."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"

    @classmethod
    def of(cls, module: nn.Module) -> Preprocess:
        """Read open_clip's preprocessing config from a CLIP model or our classifier (both have ``.visual``)."""
        import open_clip

        cfg = open_clip.get_model_preprocess_cfg(module)
        size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
        return cls(size, tuple(cfg["mean"]), tuple(cfg["std"]), cfg.get("interpolation", "bicubic"))

    def resize(self) -> v2.Compose:
        """Resize the short side and centre-crop to the model's square input (PIL images or uint8 tensors)."""
        mode = v2.InterpolationMode(self.interpolation)
        return v2.Compose([v2.Resize(self.size, interpolation=mode, antialias=True), v2.CenterCrop(self.size)])

    def decode_transform(self) -> v2.Compose:
        return v2.Compose([v2.PILToTensor(), self.resize()])

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,H,W] on any device -> normalised float32."""
        mean, std = self._stats(images.device)
        return (images.float() / 255.0 - mean) / std

    @lru_cache(maxsize=8)  # noqa: B019 - frozen and hashable; one small pair of tensors per device
    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std on ``device``, made once instead of a host-to-device copy per batch."""
        shape = (1, -1, 1, 1)
        return (torch.tensor(self.mean, device=device).view(shape), torch.tensor(self.std, device=device).view(shape))


@dataclass(frozen=True)
class ImageTensors:
    """A split decoded once: uint8 images [N,3,H,W] and int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int):
        for start in range(0, len(self), batch_size):
            yield self.images[start : start + batch_size], self.labels[start : start + batch_size]


def decode(dataset: Dataset, preprocess: Preprocess) -> ImageTensors:
    """Decode and resize every image of a (PIL image, label) dataset once."""
    transform = preprocess.decode_transform()
    images, labels = [], []
    for index in range(len(dataset)):
        image, label = dataset[index]
        images.append(transform(image.convert("RGB")))
        labels.append(int(label))
    if not images:
        raise ValueError("cannot evaluate on an empty split")
    return ImageTensors(torch.stack(images), torch.tensor(labels, dtype=torch.int64))


def bundle_for(config: DataConfig) -> DatasetBundle:
    """The dataset of a config, loaded (and, for files, verified) once per process."""
    return _bundle(config.model_dump_json())


@lru_cache(maxsize=4)
def _bundle(config_json: str) -> DatasetBundle:
    return load_dataset(DataConfig.model_validate_json(config_json))


def split_of(bundle: DatasetBundle, split: str) -> Dataset:
    if split in ("train", "heldout", "test"):
        return getattr(bundle, split)
    if split in bundle.shifts:
        return bundle.shifts[split]
    raise ValueError(f"unknown split {split!r}; known: train, heldout, test, {', '.join(bundle.shifts)}")


_DECODING = threading.Lock()


def decoded_split(config: DataConfig, split: str, preprocess: Preprocess) -> ImageTensors:
    """A split of a configured dataset, decoded once per process for a given preprocessing. Parallel trials
    start together: the lock makes the first decode and the others wait for its cached result."""
    with _DECODING:
        return _decoded(config.model_dump_json(), split, preprocess)


@lru_cache(maxsize=16)
def _decoded(config_json: str, split: str, preprocess: Preprocess) -> ImageTensors:
    return decode(split_of(_bundle(config_json), split), preprocess)


def evaluation_splits(config: DataConfig, preprocess: Preprocess) -> tuple[dict[str, ImageTensors], tuple[str, ...]]:
    """Held-out, test and every shift set of a dataset, decoded; returns (splits, shift names)."""
    shifts = tuple(bundle_for(config).shifts)
    names = ("heldout", "test", *shifts)
    return {name: decoded_split(config, name, preprocess) for name in names}, shifts


@dataclass(frozen=True)
class Metrics:
    accuracy: float
    loss: float
    count: int


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    data: ImageTensors,
    preprocess: Preprocess,
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> Metrics:
    """Top-1 accuracy and mean cross-entropy of ``model`` (in eval mode) on a decoded split."""
    device = torch.device(device)
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)  # summed on the device: one sync at the end
    loss_sum = torch.zeros((), device=device)
    for images, labels in data.batches(batch_size):
        images = preprocess.normalize(images.to(device, non_blocking=True))
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
        correct += (logits.argmax(dim=-1) == labels).sum()
    return Metrics(int(correct) / len(data), float(loss_sum) / len(data), len(data))


class NormalizedBatches:
    """Re-iterable (images, labels) batches normalised on the device as they are drawn: the learned soup's
    held-out data stays uint8 (4x smaller) until each step needs it."""

    def __init__(self, data: ImageTensors, preprocess: Preprocess, device: torch.device | str, batch_size: int):
        self.data, self.preprocess, self.device, self.batch_size = data, preprocess, torch.device(device), batch_size

    def __iter__(self):
        for images, labels in self.data.batches(self.batch_size):
            yield self.preprocess.normalize(images.to(self.device)), labels.to(self.device)

    def __len__(self) -> int:
        return -(-len(self.data) // self.batch_size)


class Evaluator:
    """One module and a set of decoded splits; scores any number of state dicts or whole models."""

    def __init__(
        self,
        module: nn.Module,
        splits: Mapping[str, ImageTensors],
        preprocess: Preprocess,
        *,
        shifts: tuple[str, ...] = (),
        device: torch.device | str = "cpu",
        batch_size: int = 512,
    ) -> None:
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.splits = dict(splits)
        self.preprocess = preprocess
        self.shifts = shifts
        self.batch_size = batch_size
        if self.device.type == "cuda":
            self.splits = {name: ImageTensors(s.images.pin_memory(), s.labels) for name, s in self.splits.items()}

    def load(self, state_dict: StateDict) -> nn.Module:
        self.module.load_state_dict(state_dict, strict=True)
        return self.module

    def metrics(self, split: str, model: nn.Module | None = None) -> Metrics:
        return evaluate(
            model or self.module, self.splits[split], self.preprocess, batch_size=self.batch_size, device=self.device
        )

    def accuracy(self, state_dict: StateDict, split: str = "heldout") -> float:
        """The ``evaluate`` callback of the greedy soup: held-out accuracy of a state dict."""
        self.load(state_dict)
        return self.metrics(split).accuracy

    def report(self, state_dict: StateDict | None = None, model: nn.Module | None = None) -> dict[str, float]:
        """Accuracy on every split, loss on held-out, and the mean over shift sets (the paper's OOD score)."""
        if state_dict is not None:
            self.load(state_dict)
        if model is not None:
            model = model.to(self.device).eval()
        row: dict[str, float] = {}
        for split in self.splits:
            metrics = self.metrics(split, model)
            row[split] = metrics.accuracy
            if split == "heldout":
                row["heldout_loss"] = metrics.loss
        if self.shifts:
            row["shift_mean"] = sum(row[s] for s in self.shifts) / len(self.shifts)
        return row
