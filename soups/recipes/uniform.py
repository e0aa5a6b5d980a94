"""Uniform soup: the plain mean of every ingredient (Wortsman et al., 2022)."""

from __future__ import annotations

from pydantic import Field, field_validator

from soups.checkpoint import Ingredient, torch_dtype
from soups.recipes.base import Dish, Recipe, RecipeInputs, RecipeOptions
from soups.statedict import average_checkpoints


class UniformOptions(RecipeOptions):
    dtype: str | None = Field(
        None, description="dtype of the soup (float32, float16, bfloat16); default: the ingredients'."
    )

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        if value is not None:
            torch_dtype(value)
        return value


def uniform_soup(ingredients: list[Ingredient], inputs: RecipeInputs, options: UniformOptions) -> list[Dish]:
    dtype = torch_dtype(options.dtype) if options.dtype else None
    state_dict = average_checkpoints([i.path for i in ingredients], dtype=dtype)
    return [Dish(name="uniform", recipe="uniform", ingredients=ingredients, state_dict=state_dict)]


RECIPE = Recipe(
    "uniform",
    uniform_soup,
    UniformOptions,
    "mean of every ingredient",
    paper_row=2,
    compared_with=("best_single",),
    published={"vit-b32": (79.97, 51.45)},
)
