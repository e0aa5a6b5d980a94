"""State-dict algebra: weighted averages of checkpoints, streamed, accumulated in float32.

Floating tensors are averaged; integer and bool tensors (counters, index buffers) cannot be, and are taken
from the first checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from soups.checkpoint import (
    SAFETENSORS_DTYPES,
    Ingredient,
    StateDict,
    check_compatible,
    ensure_finite,
    iter_tensors,
    load_state_dict,
)

Coefficients = torch.Tensor | Mapping[str, torch.Tensor]
"""One weight per checkpoint ([N]), or one [N] vector per tensor key (by-layer mixing)."""


def average_checkpoints(
    paths: Sequence[Path],
    coefficients: Coefficients | None = None,
    dtype: torch.dtype | None = None,
) -> StateDict:
    """Weighted average of checkpoint files (uniform when no coefficients), one file open at a time.

    Checkpoints are visited one after the other and each tensor is added into a float32 accumulator as soon
    as it is read, so peak memory is the accumulator plus one open file, whatever the number of files.
    The result has each tensor's stored dtype unless ``dtype`` is given.
    """
    layout = check_compatible(paths)
    n = len(paths)
    if coefficients is None:
        coefficients = torch.full((n,), 1.0 / n, dtype=torch.float64)
    accumulator: StateDict = {}
    for index, path in enumerate(paths):
        for key, tensor in iter_tensors(Path(path)):
            if not tensor.is_floating_point():
                accumulator.setdefault(key, tensor)
                continue
            ensure_finite(key, tensor, str(path))
            weight = float(_coefficient(coefficients, key)[index])
            if index == 0:
                accumulator[key] = torch.mul(tensor.float(), weight)  # upcast first: bf16 products lose bits
            else:
                accumulator[key].add_(tensor, alpha=weight)
    return {
        key: value.to(dtype or SAFETENSORS_DTYPES[layout[key].dtype]) if value.is_floating_point() else value
        for key, value in accumulator.items()
    }


def _coefficient(coefficients: Coefficients, key: str) -> torch.Tensor:
    if isinstance(coefficients, torch.Tensor):
        return coefficients
    return coefficients[key]


def load_ingredient(ingredient: Ingredient) -> StateDict:
    """Load a checkpoint and refuse it if any floating tensor holds NaN or inf."""
    state_dict = load_state_dict(ingredient.path)
    for key, tensor in state_dict.items():
        ensure_finite(key, tensor, str(ingredient.path))
    return state_dict


def to_float32(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """A float32 copy to accumulate into; non-floating tensors are shared as they are."""
    return {k: v.to(torch.float32, copy=True) if v.is_floating_point() else v for k, v in state_dict.items()}


def blend(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], weight_b: float) -> StateDict:
    """(1 - w)·a + w·b over floating tensors, in float32; non-floating tensors come from ``a``."""
    return {
        key: torch.lerp(value.float(), b[key].float(), weight_b) if value.is_floating_point() else value
        for key, value in a.items()
    }


def cast_like(state_dict: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> StateDict:
    """Give every tensor the dtype it has in ``reference`` (the soup is written as its ingredients were)."""
    return {key: value.to(reference[key].dtype) for key, value in state_dict.items()}
