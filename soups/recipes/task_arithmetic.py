"""Task arithmetic (Ilharco et al., 2023): θ = θ₀ + λ·Σᵢ τᵢ with task vectors τᵢ = θᵢ − θ₀.

Conventions: the sum is unweighted (mergekit's ``task_arithmetic`` with every ``weight`` 1 and no
``normalize``), so λ = 1/N gives the uniform soup. mergekit's default is λ = 1 (the plain sum); the paper tunes
λ on held-out data and ends near 0.3 when adding several task vectors, which is this platform's default: for
ingredients fine-tuned on the same task, λ·N ≈ 1 is the uniform soup and λ = 1 overshoots by N.
"""

from __future__ import annotations

import torch
from pydantic import Field

from soups.checkpoint import Ingredient
from soups.recipes.base import Dish, Recipe, RecipeInputs
from soups.recipes.task_vectors import (
    LAMBDAS,
    TaskVectorDetails,
    TaskVectorOptions,
    base_of,
    merge_streamed,
)


class TaskArithmeticOptions(TaskVectorOptions):
    lambda_: float = Field(
        0.3,
        alias="lambda",
        description="Scale of the summed task vectors. 0.3 is the value Ilharco et al. typically select on "
        "held-out when adding several task vectors (mergekit's default 1.0 is the plain sum); 1/N gives the "
        "uniform soup.",
    )


def add_task_vectors(deltas: torch.Tensor, base: torch.Tensor, lam: float) -> torch.Tensor:
    """θ₀ + λ·Στᵢ for one key from the stacked τᵢ, summed in the same order as mergekit's."""
    return base + deltas.sum(dim=0) * lam


def task_arithmetic(ingredients: list[Ingredient], inputs: RecipeInputs, options: TaskArithmeticOptions) -> list[Dish]:
    base = base_of("task_arithmetic", inputs)
    lam = options.lambda_

    def merge(key: str, deltas: torch.Tensor, theta0: torch.Tensor) -> torch.Tensor:
        return add_task_vectors(deltas, theta0, lam)

    state_dict = merge_streamed([i.path for i in ingredients], merge, base)
    details = TaskVectorDetails(lambda_=lam)
    return [Dish("task_arithmetic", "task_arithmetic", ingredients, state_dict=state_dict, details=details)]


RECIPE = Recipe(
    "task_arithmetic",
    task_arithmetic,
    TaskArithmeticOptions,
    "zero-shot + lambda * task-vector sum",
    needs=("base",),
    details=TaskVectorDetails,
    default_grid={"lambda": LAMBDAS},
)
