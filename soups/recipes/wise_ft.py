"""WiSE-FT baseline: θ = (1−α)·θ_zero-shot + α·θ_fine-tuned, for a list of α (Wortsman et al., 2022b), and the
zero-shot reference row itself (α = 0, the start every ingredient was fine-tuned from).

The fine-tuned end is the best ingredient by held-out score; the zero-shot end is ``inputs.base``.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from soups.checkpoint import Ingredient, check_compatible
from soups.recipes.base import (
    Dish,
    NoOptions,
    Recipe,
    RecipeDetails,
    RecipeInputs,
    RecipeOptions,
    Sweep,
    best_ingredient,
)
from soups.statedict import blend, cast_like, load_ingredient


class WiseFtOptions(RecipeOptions):
    alphas: list[float] = Field(
        default_factory=lambda: [round(0.1 * i, 1) for i in range(1, 11)],
        min_length=1,
        description="Weights of the fine-tuned end, each in [0, 1]; one dish per alpha (alpha 0 is `zero_shot`).",
    )

    @field_validator("alphas")
    @classmethod
    def _in_unit_interval(cls, alphas: list[float]) -> list[float]:
        outside = [a for a in alphas if not 0.0 <= a <= 1.0]
        if outside:
            raise ValueError(f"WiSE-FT alphas {outside} are outside [0, 1]")
        return alphas


def alpha_label(alpha: float) -> str:
    """``wise_ft_0.60`` for the default grid's alphas; every digit of any other alpha, so two alphas never
    share a label (``:.2f`` alone gave 0.123 and 0.124 one name)."""
    return f"wise_ft_{alpha:.2f}" if round(alpha, 2) == alpha else f"wise_ft_{alpha!r}"


def _dish_names(options: WiseFtOptions) -> list[str]:
    return [alpha_label(alpha) for alpha in options.alphas]


class WiseFtDetails(RecipeDetails):
    alpha: float
    """Weight of the fine-tuned end: which point of the α sweep this dish is."""
    finetuned: str

    def tags(self) -> dict[str, str]:
        return {"alpha": repr(self.alpha)}


def wise_ft(ingredients: list[Ingredient], inputs: RecipeInputs, options: WiseFtOptions) -> list[Dish]:
    finetuned = best_ingredient(ingredients)
    check_compatible([inputs.base, finetuned.path])
    zero_shot = load_ingredient(Ingredient(inputs.base, name="zero-shot"))
    tuned = load_ingredient(finetuned)
    return [
        Dish(
            alpha_label(alpha),
            "wise_ft",
            [finetuned],
            state_dict=cast_like(blend(zero_shot, tuned, alpha), tuned),
            details=WiseFtDetails(alpha=alpha, finetuned=finetuned.name),
        )
        for alpha in options.alphas
    ]


RECIPE = Recipe(
    "wise_ft",
    wise_ft,
    WiseFtOptions,
    "interpolate zero-shot and best ingredient for each alpha",
    needs=("base",),
    dish_names=_dish_names,
    details=WiseFtDetails,
    sweep=Sweep("WiSE-FT (α sweep)", origin="zero_shot"),
    paper_row=10,
)


def zero_shot(ingredients: list[Ingredient], inputs: RecipeInputs, options: NoOptions) -> list[Dish]:
    check_compatible([inputs.base, ingredients[0].path])
    return [Dish("zero_shot", "zero_shot", [], state_dict=load_ingredient(Ingredient(inputs.base, name="zero-shot")))]


ZERO_SHOT = Recipe(
    "zero_shot", zero_shot, NoOptions, "the zero-shot start itself (reference row)", needs=("base",), paper_row=8
)
