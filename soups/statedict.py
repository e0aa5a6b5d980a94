"""State-dict algebra: weighted averages of checkpoints, streamed, accumulated in float32.

Floating tensors are averaged; integer and bool tensors (counters, index buffers) cannot be, and are taken
from the first checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import torch

from soups.checkpoint import (
    SAFETENSORS_DTYPES,
    Ingredient,
    StateDict,
    check_compatible,
    ensure_finite,
    load_state_dict,
)
from soups.tensorfile import READERS, TensorFile, read_ahead

Coefficients = torch.Tensor | Mapping[str, torch.Tensor]
"""One weight per checkpoint ([N]), or one [N] vector per tensor key (by-layer mixing)."""


def average_checkpoints(
    paths: Sequence[Path],
    coefficients: Coefficients | None = None,
    dtype: torch.dtype | None = None,
) -> StateDict:
    """Weighted average of checkpoint files (uniform when no coefficients), one tensor read at a time.

    Checkpoints are visited one after the other and each tensor is added into a float32 accumulator as soon
    as it is read, into one of a few reused buffers while the next tensors are read into the others
    (`soups.tensorfile.read_ahead`), so peak memory is the accumulator plus READERS + 1 tensors, whatever the
    number of files. The result has each tensor's stored
    dtype unless ``dtype`` is given.
    """
    layout = check_compatible(paths)
    n = len(paths)
    if coefficients is None:
        coefficients = torch.full((n,), 1.0 / n, dtype=torch.float64)
    largest = max((math.prod(s.shape) * SAFETENSORS_DTYPES[s.dtype].itemsize for s in layout.values()), default=0)
    buffers = [torch.empty(largest, dtype=torch.uint8) for _ in range(READERS + 1)]
    order = [(index, key) for index in range(n) for key in layout]
    accumulator: StateDict = {}
    with ExitStack() as stack:
        files = [stack.enter_context(TensorFile(Path(path))) for path in paths]
        jobs = [
            partial(_read, files[index], key, buffers[step % len(buffers)]) for step, (index, key) in enumerate(order)
        ]
        for (index, key), tensor in zip(order, read_ahead(jobs), strict=True):
            if not tensor.is_floating_point():
                accumulator.setdefault(key, tensor.clone())
                continue
            weight = float(_coefficient(coefficients, key)[index])
            if index == 0:
                accumulator[key] = torch.mul(tensor.float(), weight)  # upcast first: bf16 products lose bits
            else:
                accumulator[key].add_(tensor, alpha=weight)
    return {
        key: value.to(dtype or SAFETENSORS_DTYPES[layout[key].dtype]) if value.is_floating_point() else value
        for key, value in accumulator.items()
    }


def _read(file: TensorFile, key: str, buffer: torch.Tensor) -> torch.Tensor:
    """``key`` of ``file`` in (a view of) ``buffer``, with its stored dtype and shape, checked finite (in the
    reading thread, beside the adding)."""
    spec = file.spec(key)
    dtype = SAFETENSORS_DTYPES[spec.dtype]
    view = buffer[: math.prod(spec.shape) * dtype.itemsize].view(dtype).view(spec.shape)
    ensure_finite(key, file.read_into(key, view), str(file.path))
    return view


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
