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
  by the order ``torch.argsort`` gives them (float32 task vectors have many equal magnitudes, so this matters).
"""

from __future__ import annotations

import torch
from pydantic import Field

from soups.checkpoint import Ingredient
from soups.recipes.base import Dish, Recipe, RecipeInputs
from soups.recipes.task_vectors import TaskVectorDetails, TaskVectorOptions, base_of, merge_streamed, stacked_deltas


class TiesOptions(TaskVectorOptions):
    density: float = Field(
        0.2, gt=0, le=1, description="Fraction of each task vector's entries kept, per tensor (the paper's k = 20%)."
    )
    lambda_: float = Field(
        1.0, alias="lambda", description="Scale of the merged task vector (1.0: the paper's and mergekit's default)."
    )


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """The top-``density`` fraction of ``delta``'s entries by magnitude, the rest zeroed."""
    if density >= 1 or delta.numel() == 0:
        return delta
    flat = delta.reshape(-1)
    # argsort, not topk: float32 task vectors hold many equal magnitudes, and the same sort as mergekit's
    # breaks ties at the k-th one the same way (topk is ~8x faster but keeps other tied entries)
    index = torch.argsort(flat.abs(), descending=True)[: max(1, int(density * flat.numel()))]
    kept = torch.zeros_like(flat)
    kept[index] = flat[index]
    return kept.view_as(delta)


def disjoint_merge(deltas: torch.Tensor) -> torch.Tensor:
    """Mean over the leading axis of the entries whose sign is the elected one (that of their sum; +1 at 0).

    Overwrites ``deltas`` (the caller's scratch) to hold one copy of the N task vectors, not three.
    """
    positive = deltas.sum(dim=0) >= 0
    agree = torch.where(positive, deltas > 0, deltas < 0)
    count = agree.sum(dim=0).clamp_(min=1)
    return deltas.mul_(agree).sum(dim=0) / count


def ties_merge(deltas: torch.Tensor, base: torch.Tensor, density: float, lam: float) -> torch.Tensor:
    """θ₀ + λ·TIES(τ) for one key; ``deltas``, the stacked task vectors, are trimmed in place."""
    for index in range(len(deltas)):
        deltas[index] = trim(deltas[index], density)
    return base + disjoint_merge(deltas) * lam


class TiesDetails(TaskVectorDetails):
    density: float


def ties(ingredients: list[Ingredient], inputs: RecipeInputs, options: TiesOptions) -> list[Dish]:
    base = base_of("ties", inputs)

    def merge(key: str, tensors: list[torch.Tensor], theta0: torch.Tensor) -> torch.Tensor:
        return ties_merge(stacked_deltas(tensors, theta0), theta0, options.density, options.lambda_)

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
