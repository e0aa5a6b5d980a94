"""The loop every task-vector recipe shares: N checkpoints (plus the zero-shot start θ₀) merged one tensor key
at a time, and the ``lambda`` option those recipes take.

For each key the N tensors (and θ₀'s) are read as float32 straight into one [N (+1), *shape] buffer and,
with θ₀, turned into task vectors τᵢ = θᵢ − θ₀ in place; the merge runs on it and its result is cast back
to the stored dtype and kept. The next keys are read meanwhile by `soups.tensorfile.READERS` threads
(`read_ahead`) into READERS + 1 buffers used in turn: peak memory is the output model plus READERS + 1 times
the N (+1) tensors of the largest key and the merge's scratch, never N whole models.
Non-floating tensors (counters, index buffers) cannot be merged and are taken from the first ingredient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import torch
from pydantic import ConfigDict, Field

from soups.checkpoint import SAFETENSORS_DTYPES, StateDict, check_compatible, ensure_finite
from soups.recipes.base import RecipeDetails, RecipeInputs, RecipeOptions
from soups.tensorfile import READERS, TensorFile, read_ahead

Merge = Callable[[str, torch.Tensor, torch.Tensor | None], torch.Tensor]
"""(key, the N ingredients' float32 tensors stacked as [N, *shape], θ₀'s float32 tensor or None) -> the merged
float32 tensor. With θ₀ the stacked tensors are the task vectors τᵢ = θᵢ − θ₀, else the weights θᵢ. They are
scratch the merge may overwrite; the result must be a new tensor."""


class TaskVectorOptions(RecipeOptions):
    """Options that include ``lambda``: a Python keyword, so the field is ``lambda_`` with the alias ``lambda``.

    Both names are accepted, and dumps use ``lambda`` so a dumped config validates again.
    """

    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)


LAMBDAS = [0.05, 0.1, 0.2, 0.3, 0.5, 1.0]
"""The λ a task-vector recipe is tuned over by default: its right scale depends on how many ingredients there
are and how far they moved (near 1/16 for 16 fine-tunes of one task, near 0.3 for one task vector each of
several tasks), so the kitchen picks it on the held-out scoring split, as Ilharco et al. and Yadav et al. did."""


class TaskVectorDetails(RecipeDetails):
    """The scale a task-vector merge was cooked with (``lambda`` in every store)."""

    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)

    lambda_: float = Field(alias="lambda")


def merge_streamed(paths: Sequence[Path], merge: Merge, base: Path | None = None) -> StateDict:
    """Merge checkpoint files key by key (see the module docstring); ``base`` is read alongside when given.

    Headers are checked first (ingredients and base must share keys, shapes and dtypes); NaN/inf in any input
    tensor is refused.
    """
    files = [Path(p) for p in paths] + ([Path(base)] if base is not None else [])
    layout = check_compatible(files)
    floating = [math.prod(spec.shape) for spec in layout.values() if SAFETENSORS_DTYPES[spec.dtype].is_floating_point]
    buffers = [torch.empty(len(files) * max(floating, default=0)) for _ in range(READERS + 1)]
    out: StateDict = {}
    with ExitStack() as stack:
        readers = [stack.enter_context(TensorFile(path)) for path in files]
        jobs = [
            partial(_read_key, key, readers, len(paths), buffers[index % len(buffers)])
            for index, key in enumerate(layout)
        ]
        for key, tensors in zip(layout, read_ahead(jobs), strict=True):
            out[key] = _merge_key(key, tensors, merge, len(paths), SAFETENSORS_DTYPES[layout[key].dtype])
    return out


def _read_key(key: str, readers: list[TensorFile], n: int, buffer: torch.Tensor) -> torch.Tensor:
    """Every file's ``key`` as rows of a view of ``buffer`` (float32), each checked finite, the N ingredients'
    turned into task vectors when θ₀ (the last file) is read too: this runs in the reading thread, so the
    subtraction overlaps the previous key's merge. A non-floating tensor is the first file's alone."""
    spec = readers[0].spec(key)
    if not SAFETENSORS_DTYPES[spec.dtype].is_floating_point:
        return readers[0].read(key)
    rows = buffer[: len(readers) * math.prod(spec.shape)].view(len(readers), *spec.shape)
    for reader, row in zip(readers, rows, strict=True):
        ensure_finite(key, reader.read_into(key, row), str(reader.path))
    if len(readers) > n:
        rows[:n].sub_(rows[n])
    return rows


def _merge_key(key: str, tensors: torch.Tensor, merge: Merge, n: int, dtype: torch.dtype) -> torch.Tensor:
    if not tensors.is_floating_point():
        return tensors
    merged = merge(key, tensors[:n], tensors[n] if len(tensors) > n else None)
    if merged.untyped_storage().data_ptr() == tensors.untyped_storage().data_ptr():
        merged = merged.clone()  # a view of the read buffer would be overwritten by the key after next
    return merged.to(dtype)


def base_of(recipe: str, inputs: RecipeInputs) -> Path:
    """The zero-shot start θ₀ every task vector is measured from; the recipe cannot cook without it."""
    inputs.require(recipe, "base")
    return Path(inputs.base)
