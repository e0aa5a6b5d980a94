"""TIES merging (Yadav et al., 2023): trim, elect sign, disjoint merge; θ = θ₀ + λ·merged.

Per tensor: keep each task vector's top-``density`` fraction of entries by magnitude (exactly
k = max(1, ⌊density·n⌋) entries), elect each entry's sign as the sign of the sum of the trimmed τᵢ (total mass),
and average only the kept entries that agree with it (zeros never count). This is mergekit's ``ties`` with
every ``weight`` 1 and ``normalize: true``. Where the paper and mergekit differ, the platform follows mergekit:

- the paper trims over the whole flattened task vector, mergekit (and this recipe, which streams one key at a
  time) per tensor;
- where the trimmed entries sum to exactly 0 the paper takes the majority sign of the whole model, mergekit
  elects +1;
- the paper keeps every entry tied with the k-th magnitude (``>=``), mergekit exactly k entries, ties broken
  by the order ``torch.argsort`` gives them (float32 task vectors have many equal magnitudes, so this matters:
  in 8 random fine-tunes a quarter of the tensors tie at the k-th one). The k-th magnitude is found without
  sorting; only a tensor with such a tie is sorted, as mergekit sorts it (``trim_each``).
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from soups.checkpoint import Ingredient
from soups.recipes.base import Dish, Recipe, RecipeInputs
from soups.recipes.task_vectors import TaskVectorDetails, TaskVectorOptions, base_of, merge_streamed


class TiesOptions(TaskVectorOptions):
    density: float = Field(
        0.2, gt=0, le=1, description="Fraction of each task vector's entries kept, per tensor (the paper's k = 20%)."
    )
    lambda_: float = Field(
        1.0, alias="lambda", description="Scale of the merged task vector (1.0: the paper's and mergekit's default)."
    )


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """The top-``density`` fraction of one task vector's entries by magnitude, the rest zeroed."""
    return trim_each(delta.reshape(1, -1).clone(), density).view_as(delta)


def trim_each(deltas: torch.Tensor, density: float) -> torch.Tensor:
    """Each row's (one task vector's) top-``density`` fraction by magnitude kept, the rest zeroed, in place:
    exactly the entries mergekit keeps.

    The k-th largest magnitude of every row comes from one partial sort (numpy's introselect, linear time)
    and the entries above it are kept. When more entries tie at it than places are left, which of them stay
    is decided by the order of the unstable full ``argsort`` mergekit uses, so that row, and only that row,
    is sorted as mergekit sorts it.
    """
    flat = deltas.reshape(len(deltas), -1)
    size = flat.shape[1]
    if density >= 1 or size == 0:
        return deltas
    k = max(1, int(density * size))
    magnitude = flat.abs()
    partitioned = magnitude.numpy()
    partitioned.partition(size - k, axis=1)
    threshold = torch.from_numpy(partitioned[:, size - k].copy()).unsqueeze(1)
    torch.abs(flat, out=magnitude)  # the partition scrambled it
    drop = magnitude < threshold
    kept = size - np.count_nonzero(drop.numpy(), axis=1)
    for row in np.flatnonzero(kept > k).tolist():  # more entries tie at the k-th magnitude than places are left
        drop[row] = True
        drop[row, torch.argsort(magnitude[row], descending=True)[:k]] = False
    return deltas.masked_fill_(drop.view_as(deltas), 0.0)


def disjoint_merge(deltas: torch.Tensor) -> torch.Tensor:
    """Mean over the leading axis of the entries whose sign is the elected one (that of their sum; +1 at 0).

    Overwrites ``deltas`` (the caller's scratch). The agreeing entries of one position share the elected sign,
    so their sum is that sign times the sum of ``sign·τᵢ`` where positive: the same float32 sum mergekit takes.
    """
    elected = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0)
    agreeing = deltas.mul_(elected).clamp_(min=0)
    count = np.count_nonzero(agreeing.reshape(len(agreeing), -1).numpy(), axis=0)
    total = agreeing.sum(dim=0).mul_(elected)
    return total.div_(torch.from_numpy(count).clamp_(min=1).view_as(total))


def ties_merge(deltas: torch.Tensor, base: torch.Tensor, density: float, lam: float) -> torch.Tensor:
    """θ₀ + λ·TIES(τ) for one key; ``deltas``, the stacked task vectors, are trimmed in place."""
    return base + disjoint_merge(trim_each(deltas, density)) * lam


class TiesDetails(TaskVectorDetails):
    density: float


def ties(ingredients: list[Ingredient], inputs: RecipeInputs, options: TiesOptions) -> list[Dish]:
    base = base_of("ties", inputs)

    def merge(key: str, deltas: torch.Tensor, theta0: torch.Tensor) -> torch.Tensor:
        return ties_merge(deltas, theta0, options.density, options.lambda_)

    state_dict = merge_streamed([i.path for i in ingredients], merge, base)
    details = TiesDetails(density=options.density, lambda_=options.lambda_)
    return [Dish("ties", "ties", ingredients, state_dict=state_dict, details=details)]


RECIPE = Recipe(
    "ties",
    ties,
    TiesOptions,
    "trim task vectors, elect signs, average the agreeing entries",
    needs=("base",),
    details=TiesDetails,
    default_grid={"density": [0.1, 0.2, 0.5], "lambda": [0.5, 1.0, 1.5]},
)
