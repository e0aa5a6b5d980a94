"""How much of a difference is noise: seeded percentile-bootstrap intervals over images.

Every candidate is scored on the same images, so a comparison of two candidates is paired: the difference of
their per-image correctness is resampled, which is far tighter than comparing two per-model intervals (most
images are right or wrong for both). A mean over several sets (the shift mean) resamples each set on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

LEVEL = 0.95
_CHUNK = 200
"""Resamples drawn at once: bounds the index tensor at _CHUNK x images."""


def _bootstrap_means(values: Sequence[torch.Tensor], resamples: int, seed: int) -> torch.Tensor:
    """[resamples] bootstrap means of the mean over sets (each set resampled on its own, seeded)."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.zeros(resamples, dtype=torch.float64)
    for per_image in values:
        per_image = per_image.to(torch.float64)
        for start in range(0, resamples, _CHUNK):
            count = min(_CHUNK, resamples - start)
            index = torch.randint(len(per_image), (count, len(per_image)), generator=generator)
            means[start : start + count] += per_image[index].mean(dim=1)
    return means / len(values)


def _percentiles(means: torch.Tensor) -> tuple[float, float]:
    tail = (1 - LEVEL) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return low, high


def bootstrap_interval(hits: Sequence[torch.Tensor], resamples: int, seed: int) -> tuple[float, float]:
    """95 % interval of the mean accuracy over one or more sets, from per-image correctness (bool [n] each)."""
    return _percentiles(_bootstrap_means(hits, resamples, seed))


@dataclass(frozen=True)
class PairedDifference:
    """Accuracy of one model minus another's on the same images, with its 95 % paired bootstrap interval."""

    difference: float
    low: float
    high: float

    @property
    def resolved(self) -> bool:
        """Whether the interval excludes 0: this data separates the two models."""
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{100 * self.difference:+.1f} points [{100 * self.low:+.1f}, {100 * self.high:+.1f}]"


def paired_difference(
    first: Sequence[torch.Tensor], second: Sequence[torch.Tensor], resamples: int, seed: int
) -> PairedDifference:
    """``first`` minus ``second`` in mean accuracy over the same sets (bool [n] per set, image for image): both
    models resampled with the same image indices."""
    if len(first) != len(second) or any(len(a) != len(b) for a, b in zip(first, second, strict=True)):
        raise ValueError("a paired comparison needs both models' hits on the same images, set for set")
    differences = [a.to(torch.float64) - b.to(torch.float64) for a, b in zip(first, second, strict=True)]
    observed = float(sum(float(d.mean()) for d in differences) / len(differences))
    low, high = _percentiles(_bootstrap_means(differences, resamples, seed))
    return PairedDifference(observed, low, high)
