"""Soup recipes: one module per recipe, listed in `RECIPES` (the registry; add a new recipe's module here).

Each module declares a `Recipe`: its name, its options (a pydantic model with defaults), the function that
cooks it and everything the kitchen needs to know about it (typed details, default grid, figures, paper row,
promotion). The configuration names recipes by string and gives options by name; both are checked against
this registry when the config is loaded. Adding a recipe is its module plus one line below.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from soups.checkpoint import Ingredient, check_compatible
from soups.recipes import (
    best,
    dare,
    ensemble,
    greedy,
    learned,
    linear_probe,
    model_stock,
    slerp,
    task_arithmetic,
    ties,
    uniform,
    wise_ft,
)
from soups.recipes.base import Dish, FitSet, NoDetails, Recipe, RecipeDetails, RecipeInputs, RecipeOptions, Sweep

RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        best.RECIPE,
        uniform.RECIPE,
        greedy.RECIPE,
        learned.LEARNED,
        learned.LEARNED_BY_LAYER,
        ensemble.RECIPE,
        ensemble.GREEDY_RECIPE,
        wise_ft.ZERO_SHOT,
        linear_probe.RECIPE,
        wise_ft.RECIPE,
        task_arithmetic.RECIPE,
        ties.RECIPE,
        dare.RECIPE,
        model_stock.RECIPE,
        slerp.RECIPE,
    )
}
"""Every recipe, in the order the kitchen cooks them by default."""

DEFAULT_KITCHEN: list[dict[str, Any]] = [
    *({"name": recipe.name, "grid": recipe.default_grid} for recipe in RECIPES.values()),
    *({"name": recipe.name, **variant} for recipe in RECIPES.values() for variant in recipe.variants),
]
"""What the kitchen cooks when the config names nothing: every recipe with its defaults (tuned over its default
grid when it declares one), then each recipe's declared variants (greedy soups built by TIES and by task
arithmetic)."""


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}") from None


def recipe_options(name: str, options: Mapping[str, Any] | None = None) -> RecipeOptions:
    """Validate ``options`` against what recipe ``name`` declares; errors name the allowed options."""
    recipe = get_recipe(name)
    try:
        return recipe.options.model_validate(dict(options or {}))
    except ValidationError as err:
        allowed = ", ".join(f.alias or name for name, f in recipe.options.model_fields.items()) or "none"
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or name}: {e['msg']}" for e in err.errors())
        raise ValueError(f"recipe {name!r} options: {problems} (allowed options: {allowed})") from None


def cook(
    name: str, ingredients: Sequence[Ingredient], inputs: RecipeInputs | None = None, **options: Any
) -> list[Dish]:
    """Check the ingredients fit together, then run one recipe; returns its dishes (WiSE-FT gives several), named
    as the recipe declares."""
    recipe, settings, inputs = get_recipe(name), recipe_options(name, options), inputs or RecipeInputs()
    inputs.require(name, *recipe.needs)
    if len(ingredients) < recipe.min_ingredients:
        raise ValueError(f"recipe {name!r} needs at least {recipe.min_ingredients} ingredients, got {len(ingredients)}")
    check_compatible([i.path for i in ingredients])
    dishes = recipe.cook(list(ingredients), inputs, settings)
    declared = recipe.names(settings)
    if [dish.name for dish in dishes] != declared:
        raise RuntimeError(f"recipe {name!r} cooked {[d.name for d in dishes]} but declares {declared}; fix its names")
    return dishes


__all__ = [
    "RECIPES",
    "Dish",
    "FitSet",
    "NoDetails",
    "Recipe",
    "RecipeDetails",
    "RecipeInputs",
    "RecipeOptions",
    "Sweep",
    "cook",
    "get_recipe",
    "recipe_options",
]
