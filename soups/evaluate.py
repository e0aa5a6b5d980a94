"""Fast evaluation of many models on the same images.

A greedy soup scores dozens of candidates on one held-out set, and the kitchen scores every candidate on
held-out, test and every shift set. Each split is therefore decoded and resized once into a uint8 tensor
(4x smaller than float, cheap to move to a GPU) and normalised per batch on the device; candidates are
loaded into one existing module with ``load_state_dict`` rather than rebuilt.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset
from torchvision.transforms import v2

from soups.checkpoint import StateDict
from soups.data import DatasetBundle
from soups.intervals import bootstrap_interval


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

    def subset(self, rows: torch.Tensor) -> ImageTensors:
        return ImageTensors(self.images[rows], self.labels[rows])

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


def evaluation_splits(bundle: DatasetBundle, preprocess: Preprocess) -> tuple[dict[str, ImageTensors], tuple[str, ...]]:
    """Held-out, test and every shift set of a dataset, each decoded once; returns (splits, shift names)."""
    splits = {"heldout": decode(bundle.heldout, preprocess), "test": decode(bundle.test, preprocess)}
    splits.update({name: decode(dataset, preprocess) for name, dataset in bundle.shifts.items()})
    return splits, tuple(bundle.shifts)


@dataclass(frozen=True)
class Metrics:
    accuracy: float
    loss: float
    count: int
    hits: torch.Tensor
    """bool [count] on the CPU: which images the model got right (for intervals and paired comparisons)."""


def _forward(
    model: nn.Module, data: ImageTensors, preprocess: Preprocess, batch_size: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(float32 logits, labels) per batch on ``device``, the model in eval mode, bf16 autocast on CUDA."""
    model.eval()
    for images, labels in data.batches(batch_size):
        images = preprocess.normalize(images.to(device, non_blocking=True))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(images)
        yield logits.float(), labels.to(device, non_blocking=True)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    data: ImageTensors,
    preprocess: Preprocess,
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> Metrics:
    """Top-1 accuracy, mean cross-entropy and per-image hits of ``model`` on a decoded split."""
    device = torch.device(device)
    hits, loss_sum = [], torch.zeros((), device=device)  # kept on the device: one sync at the end
    for logits, labels in _forward(model, data, preprocess, batch_size, device):
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        hits.append(logits.argmax(dim=-1) == labels)
    correct = torch.cat(hits).cpu()
    return Metrics(float(correct.float().mean()), float(loss_sum) / len(data), len(data), correct)


@torch.inference_mode()
def logits_of(
    model: nn.Module, data: ImageTensors, preprocess: Preprocess, *, batch_size: int = 512, device="cpu"
) -> torch.Tensor:
    """float32 logits [N, classes] of a decoded split, on the CPU (for combining models' predictions)."""
    batches = _forward(model, data, preprocess, batch_size, torch.device(device))
    return torch.cat([logits.cpu() for logits, _ in batches])


@dataclass(frozen=True)
class Report:
    """A model's accuracy per split (plus held-out loss and the shift means) and, when the evaluator
    bootstraps, a 95 % interval per accuracy."""

    scores: dict[str, float]
    intervals: dict[str, tuple[float, float]]


class Evaluator:
    """One module and a set of decoded splits; scores any number of state dicts or whole models.

    ``shifts`` are the reported distribution shifts (their mean is the paper's OOD score); ``ood_val`` are
    shift sets built from held-out images, which may select models (their mean is ``ood_val_mean``).
    """

    def __init__(
        self,
        module: nn.Module,
        splits: Mapping[str, ImageTensors],
        preprocess: Preprocess,
        *,
        shifts: tuple[str, ...] = (),
        ood_val: tuple[str, ...] = (),
        device: torch.device | str = "cpu",
        batch_size: int = 512,
        bootstrap: int = 0,
        seed: int = 0,
    ) -> None:
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.splits = dict(splits)
        self.preprocess = preprocess
        self.groups = {"shift_mean": shifts, "ood_val_mean": ood_val}
        self.batch_size = batch_size
        self.bootstrap, self.seed = bootstrap, seed
        if self.device.type == "cuda":
            self.splits = {name: ImageTensors(s.images.pin_memory(), s.labels) for name, s in self.splits.items()}

    @property
    def shifts(self) -> tuple[str, ...]:
        return self.groups["shift_mean"]

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

    def logits(self, state_dict: StateDict, split: str = "heldout") -> torch.Tensor:
        """Logits of a state dict on one split (the greedy ensemble combines them)."""
        self.load(state_dict)
        data = self.splits[split]
        return logits_of(self.module, data, self.preprocess, batch_size=self.batch_size, device=self.device)

    def labels(self, split: str = "heldout") -> torch.Tensor:
        return self.splits[split].labels

    def report(self, state_dict: StateDict | None = None, model: nn.Module | None = None) -> Report:
        """Accuracy on every split, loss on held-out, the mean over shift sets (the paper's OOD score) and over
        ood-validation sets, each with a seeded bootstrap interval when ``bootstrap`` resamples are asked for."""
        if state_dict is not None:
            self.load(state_dict)
        if model is not None:
            model = model.to(self.device).eval()
        scores: dict[str, float] = {}
        hits: dict[str, torch.Tensor] = {}
        for split in self.splits:
            metrics = self.metrics(split, model)
            scores[split], hits[split] = metrics.accuracy, metrics.hits
            if split == "heldout":
                scores["heldout_loss"] = metrics.loss
        for mean, members in self.groups.items():
            if members:
                scores[mean] = sum(scores[s] for s in members) / len(members)
        return Report(scores, self._intervals(hits))

    def _intervals(self, hits: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
        if not self.bootstrap:
            return {}
        seeds = {name: self.seed + k for k, name in enumerate([*self.splits, *self.groups])}
        intervals = {split: bootstrap_interval([h], self.bootstrap, seeds[split]) for split, h in hits.items()}
        for mean, members in self.groups.items():
            if members:
                intervals[mean] = bootstrap_interval([hits[s] for s in members], self.bootstrap, seeds[mean])
        return intervals
