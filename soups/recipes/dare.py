"""DARE (Yu et al., 2024): drop each task-vector entry with probability p, rescale survivors by 1/(1−p), then
combine the sparsified τᵢ like task arithmetic (``linear``) or TIES (``ties``).

Conventions:
- rescaling is the paper's 1/(1−p), which keeps every entry's expectation; mergekit's ``rescale`` instead
  matches each tensor's L1 norm after the drop, which equals it only in expectation;
- ``linear`` is θ₀ + λ·Σᵢ DARE(τᵢ): mergekit's ``dare_linear`` with every ``weight`` 1 (no ``normalize``);
- ``ties`` is the paper's DARE-then-TIES: this platform's ``ties`` recipe (trim to ``density``, elect signs,
  disjoint mean) on the DARE'd task vectors. With ``density`` 1 (the default) the random drop is the only
  sparsification, as in mergekit's ``dare_ties`` with ``normalize: true`` (mergekit's default sums instead);
- λ defaults to the combining recipe's own default (0.3 for ``linear``, 1.0 for ``ties``), so p = 0 cooks
  exactly the ``task_arithmetic`` or ``ties`` soup;
- the drop mask of ingredient i at key k comes from a generator seeded by (seed, i, k), so a result does not
  depend on which other keys a checkpoint holds or in which order they are read.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import torch
from pydantic import Field, model_validator

from soups.checkpoint import Ingredient
from soups.recipes.base import Dish, Recipe, RecipeInputs
from soups.recipes.task_arithmetic import TaskArithmeticOptions, add_task_vectors
from soups.recipes.task_vectors import (
    LAMBDAS,
    TaskVectorDetails,
    TaskVectorOptions,
    base_of,
    merge_streamed,
)
from soups.recipes.ties import TiesOptions, ties_merge


class DareOptions(TaskVectorOptions):
    p: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="Drop probability per task-vector entry. 0.5 (mergekit's usual density 0.5): the paper's 0.9 "
        "holds for the tiny deltas of language-model SFT, and fails as deltas grow, as full fine-tunes' do.",
    )
    combine: Literal["linear", "ties"] = Field(
        "linear", description="How the sparsified task vectors are combined: 'linear' (sum) or 'ties'."
    )
    lambda_: float | None = Field(
        None,
        alias="lambda",
        description="Scale of the combined task vector; default: that of the combining recipe "
        "(task_arithmetic's 0.3 for linear, ties' 1.0 for ties).",
    )
    density: float = Field(
        1.0, gt=0, le=1, description="ties only: fraction kept by TIES's magnitude trim after the drop (1: none)."
    )
    seed: int = Field(0, description="Seed of the drop masks.")

    @model_validator(mode="after")
    def _density_is_for_ties(self) -> DareOptions:
        if self.combine == "linear" and self.density != 1:
            raise ValueError("density trims for combine='ties'; combine='linear' sums the task vectors untrimmed")
        return self

    def scale(self) -> float:
        defaults = {"linear": TaskArithmeticOptions(), "ties": TiesOptions()}
        return self.lambda_ if self.lambda_ is not None else defaults[self.combine].lambda_


def drop_generator(seed: int, index: int, key: str) -> torch.Generator:
    """A generator for ingredient ``index`` at ``key``, independent of every other (index, key) pair."""
    digest = hashlib.sha256(f"{seed}\0{index}\0{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def drop_and_rescale(delta: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Zero each entry with probability p and divide the survivors by 1 − p (unbiased: E[result] = delta)."""
    if p == 0:
        return delta
    keep = torch.rand(delta.shape, generator=generator) >= p
    return delta * keep / (1 - p)


class DareDetails(TaskVectorDetails):
    p: float
    combine: str
    seed: int
    density: float | None = None
    """TIES' density, when the dropped task vectors are TIES-merged."""


def dare(ingredients: list[Ingredient], inputs: RecipeInputs, options: DareOptions) -> list[Dish]:
    base = base_of("dare", inputs)
    lam = options.scale()

    def merge(key: str, deltas: torch.Tensor, theta0: torch.Tensor) -> torch.Tensor:
        for index in range(len(deltas)):
            deltas[index] = drop_and_rescale(deltas[index], options.p, drop_generator(options.seed, index, key))
        if options.combine == "ties":
            return ties_merge(deltas, theta0, options.density, lam)
        return add_task_vectors(deltas, theta0, lam)

    state_dict = merge_streamed([i.path for i in ingredients], merge, base)
    density = options.density if options.combine == "ties" else None
    details = DareDetails(p=options.p, combine=options.combine, lambda_=lam, seed=options.seed, density=density)
    (name,) = _dish_names(options)
    return [Dish(name, "dare", ingredients, state_dict=state_dict, details=details)]


def _dish_names(options: DareOptions) -> list[str]:
    return [f"dare_{options.combine}"]


RECIPE = Recipe(
    "dare",
    dare,
    DareOptions,
    "drop and rescale task-vector entries, then sum or TIES-merge them",
    needs=("base",),
    dish_names=_dish_names,
    details=DareDetails,
    default_grid={"lambda": LAMBDAS},
)
