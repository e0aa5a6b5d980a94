"""Soup recipes, one module per recipe, registered by name.

A configuration names recipes by string (``uniform``, ``greedy``, ``learned``, ``learned_by_layer``,
``ensemble``, ``wise_ft``, ``best``); adding a recipe is adding one module here that calls ``@register``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Sequence

from soups.checkpoint import Ingredient, check_compatible
from soups.recipes.base import Dish, Kitchen, Recipe

RECIPES: dict[str, Recipe] = {}


def register(name: str):
    """Decorator adding a recipe function to the registry under ``name``."""

    def add(recipe: Recipe) -> Recipe:
        if name in RECIPES:
            raise ValueError(f"recipe {name!r} is registered twice")
        RECIPES[name] = recipe
        return recipe

    return add


def get_recipe(name: str) -> Recipe:
    _load_recipe_modules()
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(sorted(RECIPES))}") from None


def recipe_names() -> list[str]:
    _load_recipe_modules()
    return sorted(RECIPES)


def cook(name: str, ingredients: Sequence[Ingredient], kitchen: Kitchen | None = None, **options) -> list[Dish]:
    """Check the ingredients fit together, then run one recipe; returns its dishes (WiSE-FT gives several)."""
    recipe = get_recipe(name)
    check_compatible([i.path for i in ingredients])
    return recipe(list(ingredients), kitchen or Kitchen(), **options)


def _load_recipe_modules() -> None:
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


__all__ = ["RECIPES", "Dish", "Kitchen", "Recipe", "cook", "get_recipe", "recipe_names", "register"]
