"""Model Stock (Jang et al., 2024): per tensor, pull the mean of the fine-tunes toward θ₀ by how much their
task vectors agree.

cosθ = mean pairwise cosine similarity of the flattened τᵢ, t = k·cosθ / (1 + (k−1)·cosθ) with k = N, and
θ = t·mean(θᵢ) + (1−t)·θ₀. Edge cases follow mergekit's ``model_stock`` (``filter_wise: false``):

- at least 2 ingredients (mergekit: a base plus two models); one gives no pair to measure agreement on;
- each norm product is clamped to ≥ 1e-6, so a zero task vector has cosine 0 with the others, and each cosine
  is clamped to [-1, 1];
- where |1 + (k−1)·cosθ| < 1e-6 (no finite t) the tensor keeps θ₀ (t = 0); t itself is not clamped, so
  opposing task vectors (cosθ < 0) give t < 0, as in the formula and mergekit.

The paper averages per layer; mergekit and this recipe do it per tensor. Each tensor's t is in the dish's
details.
"""

from __future__ import annotations

import torch

from soups.checkpoint import Ingredient
from soups.recipes.base import Dish, NoOptions, Recipe, RecipeDetails, RecipeInputs
from soups.recipes.task_vectors import base_of, merge_streamed


def mean_pairwise_cosine(deltas: torch.Tensor) -> float:
    """Mean cosine similarity over the pairs of rows of ``deltas`` ([N, D]), from one Gram matrix."""
    gram = deltas @ deltas.T
    norms = gram.diagonal().clamp(min=0).sqrt()
    cosines = (gram / torch.outer(norms, norms).clamp(min=1e-6)).clamp(-1, 1)
    rows, cols = torch.triu_indices(len(deltas), len(deltas), offset=1)
    return float(cosines[rows, cols].mean())


def interpolation_ratio(cos_theta: float, k: int) -> float:
    """t = k·cosθ / (1 + (k−1)·cosθ), or 0 (keep θ₀) at the singularity."""
    denominator = 1 + (k - 1) * cos_theta
    return 0.0 if abs(denominator) < 1e-6 else k * cos_theta / denominator


class ModelStockDetails(RecipeDetails):
    t: dict[str, float]
    """Per tensor key, the interpolation ratio toward the ingredients' mean."""


def model_stock(ingredients: list[Ingredient], inputs: RecipeInputs, options: NoOptions) -> list[Dish]:
    base = base_of("model_stock", inputs)
    ratios: dict[str, float] = {}

    def merge(key: str, deltas: torch.Tensor, theta0: torch.Tensor) -> torch.Tensor:
        cos_theta = mean_pairwise_cosine(deltas.flatten(1))
        t = ratios[key] = interpolation_ratio(cos_theta, len(deltas))
        return torch.add(theta0, deltas.sum(dim=0), alpha=t / len(deltas))  # t·mean(θᵢ) + (1−t)·θ₀

    state_dict = merge_streamed([i.path for i in ingredients], merge, base)
    return [Dish("model_stock", "model_stock", ingredients, state_dict=state_dict, details=ModelStockDetails(t=ratios))]


RECIPE = Recipe(
    "model_stock",
    model_stock,
    NoOptions,
    "ingredients' mean pulled toward zero-shot by agreement",
    needs=("base",),
    min_ingredients=2,
    details=ModelStockDetails,
)
