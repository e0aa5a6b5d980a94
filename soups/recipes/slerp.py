"""SLERP: spherical interpolation of two models' weights by a factor t, per tensor.

Per tensor, as mergekit's ``slerp``: the two flattened tensors' angle θ comes from their normalised dot
product (a norm ≤ 1e-8 counts as 1, the dot is clamped to [-1, 1]); when they are nearly colinear or
antipodal (|cos θ| > 0.9995) the result is the linear interpolation (1−t)·a + t·b, otherwise
sin((1−t)θ)/sin θ·a + sin(tθ)/sin θ·b. The raw weights are interpolated (no task vectors, no θ₀).

Endpoints: with exactly 2 ingredients, the first (t = 0) and the second (t = 1), as mergekit's base and other
model. With more, the best ingredient by held-out score (t = 0) and the uniform soup of all of them (t = 1):
a spherical path from the best single model to the soup, like WiSE-FT's linear one from zero-shot.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from soups.checkpoint import Ingredient
from soups.recipes.base import Dish, Recipe, RecipeDetails, RecipeInputs, RecipeOptions, best_ingredient
from soups.recipes.task_vectors import merge_streamed

DOT_THRESHOLD = 0.9995
"""|cos θ| above which two tensors count as colinear and are interpolated linearly (mergekit's value)."""


class SlerpOptions(RecipeOptions):
    t: float = Field(0.5, ge=0, le=1, description="Interpolation factor: 0 gives the first endpoint, 1 the second.")


class SlerpDetails(RecipeDetails):
    t: float
    endpoints: list[str]
    """The ingredients at t = 0 and t = 1 (``uniform``: the uniform soup of all of them)."""


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation from ``a`` (t = 0) to ``b`` (t = 1), linear when they are nearly colinear."""
    norm_a, norm_b = float(a.norm()), float(b.norm())
    scale = (norm_a if norm_a > eps else 1.0) * (norm_b if norm_b > eps else 1.0)
    cos_theta = min(1.0, max(-1.0, float(torch.dot(a.reshape(-1), b.reshape(-1))) / scale))
    if abs(cos_theta) > DOT_THRESHOLD:
        return torch.lerp(a, b, t)
    theta = math.acos(cos_theta)
    return a * (math.sin((1 - t) * theta) / math.sin(theta)) + b * (math.sin(t * theta) / math.sin(theta))


def slerp_recipe(ingredients: list[Ingredient], inputs: RecipeInputs, options: SlerpOptions) -> list[Dish]:
    pair = len(ingredients) == 2
    start = 0 if pair else ingredients.index(best_ingredient(ingredients))

    def merge(key: str, tensors: torch.Tensor, base: None) -> torch.Tensor:
        end = tensors[1] if pair else tensors.sum(dim=0) / len(tensors)
        return slerp(tensors[start], end, options.t)

    state_dict = merge_streamed([i.path for i in ingredients], merge)
    endpoints = [ingredients[start].name, ingredients[1].name if pair else "uniform"]
    details = SlerpDetails(t=options.t, endpoints=endpoints)
    return [Dish("slerp", "slerp", ingredients, state_dict=state_dict, details=details)]


RECIPE = Recipe(
    "slerp",
    slerp_recipe,
    SlerpOptions,
    "spherical interpolation: 2 ingredients, or best to uniform soup",
    min_ingredients=2,
    details=SlerpDetails,
)
