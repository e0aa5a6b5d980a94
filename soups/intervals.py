"""How much of a difference is noise: seeded percentile-bootstrap intervals over images.

Every candidate is resampled with the same indices (one generator seed per split), so intervals of different
models on one split are paired, and a mean over several sets (the shift mean) resamples each set on its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

LEVEL = 0.95
_CHUNK = 200
"""Resamples drawn at once: bounds the index tensor at _CHUNK x images."""


def bootstrap_interval(hits: Sequence[torch.Tensor], resamples: int, seed: int) -> tuple[float, float]:
    """95 % interval of the mean accuracy over one or more sets, from per-image correctness (bool [n] each)."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.zeros(resamples, dtype=torch.float64)
    for correct in hits:
        values = correct.to(torch.float64)
        for start in range(0, resamples, _CHUNK):
            count = min(_CHUNK, resamples - start)
            index = torch.randint(len(values), (count, len(values)), generator=generator)
            means[start : start + count] += values[index].mean(dim=1)
    means /= len(hits)
    tail = (1 - LEVEL) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return low, high
