"""Best single model by held-out score: the baseline every soup must beat."""

from __future__ import annotations

from soups.checkpoint import Ingredient
from soups.recipes.base import Dish, NoOptions, Recipe, RecipeDetails, RecipeInputs, best_ingredient
from soups.statedict import load_ingredient


class BestDetails(RecipeDetails):
    heldout_score: float
    ingredient: str


def best_single(ingredients: list[Ingredient], inputs: RecipeInputs, options: NoOptions) -> list[Dish]:
    best = best_ingredient(ingredients)
    details = BestDetails(heldout_score=best.score, ingredient=best.name)
    return [Dish("best_single", "best", [best], state_dict=load_ingredient(best), details=details)]


RECIPE = Recipe(
    "best",
    best_single,
    NoOptions,
    "the best ingredient by held-out score",
    dish_names=lambda _: ["best_single"],
    details=BestDetails,
    paper_row=1,
    published={"vit-b32": (80.38, 47.83)},
)
