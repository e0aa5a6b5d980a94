"""WiSE-FT baseline: θ = (1−α)·θ_zero-shot + α·θ_fine-tuned, for a list of α (Wortsman et al., 2022b).

The fine-tuned end is the best ingredient by held-out score; the zero-shot end is ``kitchen.base``.
"""

from __future__ import annotations

from collections.abc import Sequence

from soups.checkpoint import Ingredient, check_compatible
from soups.recipes import register
from soups.recipes.base import Dish, Kitchen, best_ingredient
from soups.statedict import blend, cast_like, load_ingredient

DEFAULT_ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))


@register("wise_ft")
def wise_ft_recipe(
    ingredients: list[Ingredient], kitchen: Kitchen, alphas: Sequence[float] = DEFAULT_ALPHAS
) -> list[Dish]:
    kitchen.require("wise_ft", "base")
    finetuned = best_ingredient(ingredients)
    check_compatible([kitchen.base, finetuned.path])
    zero_shot = load_ingredient(Ingredient(kitchen.base, name="zero-shot"))
    tuned = load_ingredient(finetuned)
    dishes = []
    for alpha in alphas:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"WiSE-FT alpha {alpha} is outside [0, 1]")
        state_dict = cast_like(blend(zero_shot, tuned, alpha), tuned)
        dishes.append(
            Dish(
                f"wise_ft_{alpha:.2f}",
                "wise_ft",
                [finetuned],
                state_dict=state_dict,
                details={"alpha": alpha, "finetuned": finetuned.name},
            )
        )
    return dishes
