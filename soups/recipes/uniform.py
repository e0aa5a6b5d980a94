"""Uniform soup: the plain mean of every ingredient (Wortsman et al., 2022)."""

from __future__ import annotations

import torch

from soups.checkpoint import Ingredient
from soups.recipes import register
from soups.recipes.base import Dish, Kitchen
from soups.statedict import average_checkpoints


@register("uniform")
def uniform_soup(ingredients: list[Ingredient], kitchen: Kitchen, dtype: torch.dtype | None = None) -> list[Dish]:
    state_dict = average_checkpoints([i.path for i in ingredients], dtype=dtype)
    return [Dish(name="uniform", recipe="uniform", ingredients=ingredients, state_dict=state_dict)]
