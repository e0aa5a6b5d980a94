"""Fast evaluation of many models on the same images.

A greedy soup scores dozens of candidates on one held-out set, and the kitchen scores every candidate on
held-out, test and every shift set. Splits are therefore decoded once into uint8 tensors while they fit the
cache budget (held-out first: it is the one scored dozens of times) and streamed by workers beyond it;
candidates are loaded into one existing module with ``load_state_dict`` rather than rebuilt. A shift set
not scored on the model's classes one for one is scored as the official code does, on its own classes: each
class's logit is the max of the model's logits over its group of classes (`pool_logits`): singleton groups
restrict the logits to the classes a set covers (ImageNet-A/-R), larger ones pool ObjectNet's 113 classes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.nn import functional as F

from soups.checkpoint import StateDict, load_checkpoint_into
from soups.config import Precision
from soups.data import DatasetBundle
from soups.images import ImageSplit, ImageTensors, Preprocess, cached_or_streamed
from soups.intervals import PairedDifference, bootstrap_interval, paired_difference
from soups.splits import OOD_VAL_MEAN, SHIFT_MEAN


def evaluation_splits(
    bundle: DatasetBundle, preprocess: Preprocess, cache_bytes: int | None = None, workers: int = 2
) -> tuple[dict[str, ImageSplit], tuple[str, ...]]:
    """Held-out, test and every shift set of a dataset, decoded once while they fit ``cache_bytes`` (no limit
    by default) in that order, streamed beyond; returns (splits, shift names)."""
    named = [("heldout", bundle.heldout), ("test", bundle.test), *bundle.shifts.items()]
    budget = cache_bytes if cache_bytes is not None else sum(len(d) for _, d in named) * preprocess.image_bytes()
    return cached_or_streamed(named, preprocess, budget, workers), tuple(bundle.shifts)


@dataclass(frozen=True)
class Metrics:
    accuracy: float
    loss: float
    count: int
    hits: torch.Tensor
    """bool [count] on the CPU: which images the model got right (for intervals and paired comparisons)."""


Groups = Sequence[Sequence[int]]
"""Per class a split is scored on, the model classes it pools (`soups.imagefiles.ClassGroups`)."""


def group_index(groups: Groups, device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 [G, L] model-class indices, one row per group, shorter groups padded with their own first class
    (repeating a member leaves a max unchanged)."""
    if not groups or any(len(group) == 0 for group in groups):
        raise ValueError("every class a split is scored on needs at least one model class")
    width = max(len(group) for group in groups)
    rows = [list(group) + [group[0]] * (width - len(group)) for group in groups]
    return torch.as_tensor(rows, dtype=torch.int64, device=device)


def pool_logits(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[B, classes] -> [B, G]: each group's score is the max of its classes' logits (`group_index`)."""
    return logits[:, index].amax(dim=-1)


@runtime_checkable
class MemberEnsemble(Protocol):
    """A model whose output is the mean of its member checkpoints' logits (`soups.recipes.ensemble`): the
    evaluator scores it member by member in its own module, one model's weights at a time."""

    members: list[Path]


def _forward(
    model: nn.Module,
    data: ImageSplit,
    preprocess: Preprocess,
    batch_size: int,
    device: torch.device,
    groups: Groups | None = None,
    precision: Precision = "fp32",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(float32 logits, labels) per batch on ``device``, the model in eval mode; ``precision`` bf16 runs it under
    bfloat16 autocast (on any device), fp32 without (the official evaluation). With ``groups`` the logits are
    the split's own classes' (`pool_logits`), which its labels index."""
    model.eval()
    index = group_index(groups, device) if groups is not None else None
    for images, labels in data.batches(batch_size):
        images = preprocess.normalize(images.to(device, non_blocking=True))
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(images).float()
        yield (pool_logits(logits, index) if index is not None else logits), labels


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    data: ImageSplit,
    preprocess: Preprocess,
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    groups: Groups | None = None,
    precision: Precision = "fp32",
) -> Metrics:
    """Top-1 accuracy, mean cross-entropy and per-image hits of ``model`` on a split, in ``precision``; with
    ``groups`` (a split scored on classes of its own, labelled by them) both on the pooled logits."""
    device = torch.device(device)
    hits, loss_sum = [], torch.zeros((), device=device)  # kept on the device: one sync at the end
    for logits, labels in _forward(model, data, preprocess, batch_size, device, groups, precision):
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        hits.append(logits.argmax(dim=-1) == labels)
    correct = torch.cat(hits).cpu()
    return Metrics(float(correct.float().mean()), float(loss_sum) / len(data), len(data), correct)


@torch.inference_mode()
def logits_of(
    model: nn.Module,
    data: ImageSplit,
    preprocess: Preprocess,
    *,
    batch_size: int = 512,
    device="cpu",
    groups: Groups | None = None,
    precision: Precision = "fp32",
) -> torch.Tensor:
    """float32 logits [N, classes] of a decoded split, on the CPU (for combining models' predictions); with
    ``groups``, the pooled logits [N, groups]."""
    batches = _forward(model, data, preprocess, batch_size, torch.device(device), groups, precision)
    return torch.cat([logits.cpu() for logits, _ in batches])


@dataclass(frozen=True)
class Report:
    """A model's accuracy per split (plus held-out loss and the shift means) and, when the evaluator
    bootstraps, a 95 % interval per accuracy."""

    scores: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    hits: dict[str, torch.Tensor]
    """Per split, which images the model got right: what paired comparisons resample."""


class Evaluator:
    """One module and a set of decoded splits; scores any number of state dicts or whole models.

    ``shifts`` are the reported distribution shifts (their mean is the paper's OOD score); ``ood_val`` are
    shift sets built from held-out images, which may select models (their mean is ``ood_val_mean``).
    ``class_groups``: per split scored on classes of its own (`DatasetBundle.class_groups`), the model classes
    each pools; ``precision``: what every evaluation computes in (``eval.precision``).
    """

    def __init__(
        self,
        module: nn.Module,
        splits: Mapping[str, ImageSplit],
        preprocess: Preprocess,
        *,
        shifts: tuple[str, ...] = (),
        ood_val: tuple[str, ...] = (),
        class_groups: Mapping[str, Groups] | None = None,
        device: torch.device | str = "cpu",
        batch_size: int = 512,
        bootstrap: int = 0,
        seed: int = 0,
        precision: Precision = "fp32",
    ) -> None:
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.splits = dict(splits)
        self.preprocess = preprocess
        self.means = {SHIFT_MEAN: shifts, OOD_VAL_MEAN: ood_val}
        """Each mean score and the splits it averages."""
        self.batch_size = batch_size
        self.bootstrap, self.seed, self.precision = bootstrap, seed, precision
        self.class_groups = dict(class_groups or {})
        if self.device.type == "cuda":
            self.splits = {n: s.pinned() if isinstance(s, ImageTensors) else s for n, s in self.splits.items()}

    @property
    def shifts(self) -> tuple[str, ...]:
        return self.means[SHIFT_MEAN]

    def load(self, state_dict: StateDict) -> nn.Module:
        self.module.load_state_dict(state_dict, strict=True)
        return self.module

    def load_file(self, path: Path) -> nn.Module:
        """The checkpoint at ``path`` streamed into the one module (`load_checkpoint_into`)."""
        return load_checkpoint_into(self.module, path)

    def metrics(self, split: str, model: nn.Module | None = None) -> Metrics:
        return evaluate(model or self.module, self.splits[split], self.preprocess, **self._how(split))

    def accuracy(self, state_dict: StateDict, split: str = "heldout") -> float:
        """The ``evaluate`` callback of the greedy soup: held-out accuracy of a state dict."""
        self.load(state_dict)
        return self.metrics(split).accuracy

    def logits(self, state_dict: StateDict, split: str = "heldout") -> torch.Tensor:
        """Logits of a state dict on one split (the greedy ensemble combines them); pooled on a grouped split."""
        self.load(state_dict)
        return logits_of(self.module, self.splits[split], self.preprocess, **self._how(split))

    @torch.inference_mode()
    def ensemble_metrics(self, split: str, members: Sequence[Path]) -> Metrics:
        """Metrics of the mean logits of ``members`` on ``split``: each member loaded into the module once and its
        logits added per batch, as a module averaging its members' outputs batch by batch would (same sums, same
        order, in the dtype the module computes in), so one model and one split's summed logits are held."""
        how = self._how(split)
        totals: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        for index, path in enumerate(members):
            self.load_file(path)
            for batch, (logits, batch_labels) in enumerate(self._raw_logits(split, how)):
                if index == 0:
                    totals.append(logits)
                    labels.append(batch_labels)
                else:
                    totals[batch] = totals[batch] + logits
        index = group_index(how["groups"], self.device) if how["groups"] is not None else None
        hits, loss_sum = [], torch.zeros((), device=self.device)
        for total, batch_labels in zip(totals, labels, strict=True):
            mean = (total / len(members)).float()
            mean = pool_logits(mean, index) if index is not None else mean
            loss_sum += F.cross_entropy(mean, batch_labels, reduction="sum")
            hits.append(mean.argmax(dim=-1) == batch_labels)
        data = self.splits[split]
        correct = torch.cat(hits).cpu()
        return Metrics(float(correct.float().mean()), float(loss_sum) / len(data), len(data), correct)

    def _raw_logits(self, split: str, how: dict[str, Any]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(logits as the module outputs them under the split's precision, labels) per batch."""
        self.module.eval()
        for images, labels in self.splits[split].batches(how["batch_size"]):
            images = self.preprocess.normalize(images.to(self.device, non_blocking=True))
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=how["precision"] == "bf16"):
                yield self.module(images), labels.to(self.device, non_blocking=True)

    def _how(self, split: str) -> dict[str, Any]:
        """How every evaluation of ``split`` runs: batch, device, its class groups, the precision."""
        groups = self.class_groups.get(split)
        return {"batch_size": self.batch_size, "device": self.device, "groups": groups, "precision": self.precision}

    def labels(self, split: str = "heldout") -> torch.Tensor:
        return self.splits[split].labels

    def report(
        self, state_dict: StateDict | None = None, model: nn.Module | None = None, path: Path | None = None
    ) -> Report:
        """Accuracy on every split, loss on held-out, the mean over shift sets (the paper's OOD score) and over
        ood-validation sets, each with a seeded bootstrap interval when ``bootstrap`` resamples are asked for.
        ``path``: a checkpoint streamed into the module (`load_file`); a `MemberEnsemble` ``model`` is scored
        member by member in the module (`ensemble_metrics`)."""
        if state_dict is not None:
            self.load(state_dict)
        if path is not None:
            self.load_file(path)
        members = model.members if isinstance(model, MemberEnsemble) else None
        if model is not None and members is None:
            model = model.to(self.device).eval()
        scores: dict[str, float] = {}
        hits: dict[str, torch.Tensor] = {}
        for split in self.splits:
            metrics = self.ensemble_metrics(split, members) if members else self.metrics(split, model)
            scores[split], hits[split] = metrics.accuracy, metrics.hits
            if split == "heldout":
                scores["heldout_loss"] = metrics.loss
        for mean, members in self.means.items():
            if members:
                scores[mean] = sum(scores[s] for s in members) / len(members)
        return Report(scores, self._intervals(hits), hits)

    def members(self, score: str) -> tuple[str, ...]:
        """The splits an accuracy is measured on: a mean's sets (``shift_mean``), or the split itself."""
        return self.means.get(score) or (score,)

    def paired(
        self, first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor], score: str
    ) -> PairedDifference | None:
        """``first`` minus ``second`` on ``score`` from two models' per-split hits on these very images, with a
        paired bootstrap interval (the same resampled images for both); None when intervals are off."""
        if not self.bootstrap:
            return None
        sets = self.members(score)
        return paired_difference([first[s] for s in sets], [second[s] for s in sets], self.bootstrap, self._seed(score))

    def _seed(self, score: str) -> int:
        """One bootstrap seed per split or mean, so every model is resampled with the same image indices."""
        return self.seed + [*self.splits, *self.means].index(score)

    def _intervals(self, hits: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
        if not self.bootstrap:
            return {}
        intervals = {split: bootstrap_interval([h], self.bootstrap, self._seed(split)) for split, h in hits.items()}
        for mean, members in self.means.items():
            if members:
                intervals[mean] = bootstrap_interval([hits[s] for s in members], self.bootstrap, self._seed(mean))
        return intervals
