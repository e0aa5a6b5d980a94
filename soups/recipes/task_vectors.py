"""The loop every task-vector recipe shares: N checkpoints (plus the zero-shot start θ₀) merged one tensor key
at a time, and the ``lambda`` option those recipes take.

All files are opened with ``safe_open`` at once; for each key the tensor is read from every file, merged in
float32, cast back to the stored dtype and kept, and the inputs are dropped before the next key is read. Peak
memory is the output model plus the N (+1) tensors of the largest key and the merge's scratch, never N whole
models. Non-floating tensors (counters, index buffers) cannot be merged and are taken from the first ingredient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from pydantic import ConfigDict, Field
from safetensors import SafetensorError, safe_open

from soups.checkpoint import CheckpointError, StateDict, check_compatible, ensure_finite
from soups.recipes.base import RecipeDetails, RecipeInputs, RecipeOptions

Merge = Callable[[str, list[torch.Tensor], torch.Tensor | None], torch.Tensor]
"""(key, the N ingredients' float32 tensors, θ₀'s float32 tensor or None) -> the merged float32 tensor."""


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
    out: StateDict = {}
    with ExitStack() as stack:
        handles = [stack.enter_context(_open(path)) for path in files]
        for key in layout:
            out[key] = _merge_key(key, handles, files, merge, len(paths))
    return out


def _merge_key(key: str, handles: list[Any], files: list[Path], merge: Merge, n: int) -> torch.Tensor:
    """Read and merge one key; its input tensors live only in this call, so one key's worth is held at a time."""
    tensors = [_read(handle, key, path) for handle, path in zip(handles, files, strict=True)]
    first = tensors[0]
    if not first.is_floating_point():
        return first
    for path, tensor in zip(files, tensors, strict=True):
        ensure_finite(key, tensor, str(path))
    base = tensors[n].float() if len(tensors) > n else None
    return merge(key, [t.float() for t in tensors[:n]], base).to(first.dtype)


def _open(path: Path) -> Any:
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as err:
        raise CheckpointError(f"{path}: cannot open ({err}); the file is damaged, fetch it again") from err


def _read(handle: Any, key: str, path: Path) -> torch.Tensor:
    try:
        return handle.get_tensor(key)
    except SafetensorError as err:
        raise CheckpointError(f"{path}: cannot read tensor {key!r} ({err}); the file is damaged") from err


def stacked_deltas(tensors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """Task vectors τᵢ = θᵢ − θ₀ of one key, stacked on a new leading axis ([N, *shape])."""
    return torch.stack(tensors).sub_(base)


def base_of(recipe: str, inputs: RecipeInputs) -> Path:
    """The zero-shot start θ₀ every task vector is measured from; the recipe cannot cook without it."""
    inputs.require(recipe, "base")
    return Path(inputs.base)
