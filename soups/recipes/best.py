"""Best single model by held-out score: the baseline every soup must beat."""

from __future__ import annotations

from soups.checkpoint import Ingredient
from soups.recipes import register
from soups.recipes.base import Dish, Kitchen, best_ingredient
from soups.statedict import load_ingredient


@register("best")
def best_single_recipe(ingredients: list[Ingredient], kitchen: Kitchen) -> list[Dish]:
    best = best_ingredient(ingredients)
    return [
        Dish(
            "best_single",
            "best",
            [best],
            state_dict=load_ingredient(best),
            details={"heldout_score": best.score, "ingredient": best.name},
        )
    ]
