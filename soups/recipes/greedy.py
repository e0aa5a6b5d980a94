"""Greedy soup: add ingredients best-first, keeping each only if the held-out score holds up.

The paper keeps an ingredient when the soup's held-out accuracy "does not decrease" (``>=``, the default);
the official code keeps it only when it strictly increases (``strict=True``). The soup is a running average,
candidate = soup·n/(n+1) + new/(n+1), so accepted ingredients are never re-summed.

With ``combine`` naming another recipe (ties, model_stock, ...), each candidate is that recipe cooked on the
accepted ingredients plus the new one, with the same inputs (e.g. the zero-shot base); the soup starts as the
best ingredient alone, as the uniform one does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from pydantic import Field, ValidationInfo, field_validator

from soups.checkpoint import SAFETENSORS_DTYPES, Ingredient, StateDict, ensure_finite, iter_tensors, read_header
from soups.figures import canvas
from soups.recipes.base import Dish, Evaluate, Recipe, RecipeDetails, RecipeInputs, RecipeOptions
from soups.selection import best_first
from soups.statedict import load_ingredient


@dataclass(frozen=True)
class GreedyStep:
    """One candidate considered: its own score, the soup's score with it, and whether it was kept."""

    ingredient: str
    ingredient_score: float
    candidate_score: float
    accepted: bool
    soup_size: int


@dataclass
class GreedyResult:
    state_dict: StateDict
    accepted: list[Ingredient]
    score: float
    trajectory: list[GreedyStep]
    evaluations: int


Combine = Callable[[list[Ingredient]], StateDict]
"""Builds the candidate soup of the given ingredients (the running average is used when there is none)."""


def greedy_soup(
    ingredients: list[Ingredient], evaluate: Evaluate, *, strict: bool = False, combine: Combine | None = None
) -> GreedyResult:
    """Cook a greedy soup; ingredients without a held-out score are scored with ``evaluate`` first.

    With every score given, this makes exactly N-1 calls to ``evaluate`` for N ingredients.
    """
    evaluations = 0
    scored: list[Ingredient] = []
    for ingredient in ingredients:
        if ingredient.score is None:
            ingredient = _with_score(ingredient, evaluate(load_ingredient(ingredient)))
            evaluations += 1
        scored.append(ingredient)
    ranked = best_first(scored)  # accuracy, then held-out loss, then version: one order everywhere

    best = ranked[0]
    stored = {key: SAFETENSORS_DTYPES[spec.dtype] for key, spec in read_header(best.path).items()}
    soup = {k: v.float() for k, v in load_ingredient(best).items()}  # no second copy when stored in float32
    accepted = [best]
    score = float(best.score)
    trajectory = [GreedyStep(best.name, score, score, True, 1)]
    for ingredient in ranked[1:]:
        if combine is None:
            candidate = blend_file(soup, ingredient, 1.0 / (len(accepted) + 1))
        else:
            candidate = combine([*accepted, ingredient])
        candidate_score = float(evaluate(candidate))
        evaluations += 1
        keep = candidate_score > score if strict else candidate_score >= score
        if keep:
            soup, score = candidate, candidate_score
            accepted.append(ingredient)
        trajectory.append(GreedyStep(ingredient.name, float(ingredient.score), candidate_score, keep, len(accepted)))
    return GreedyResult({k: v.to(stored[k]) for k, v in soup.items()}, accepted, score, trajectory, evaluations)


def blend_file(soup: StateDict, ingredient: Ingredient, weight: float) -> StateDict:
    """`blend` of the running soup with an ingredient read one tensor at a time (the soup and the candidate are
    the only models held); the ingredient's non-floating tensors are the soup's, as `blend` keeps them."""
    candidate = {}
    for key, tensor in iter_tensors(ingredient.path):
        ensure_finite(key, tensor, str(ingredient.path))
        value = soup[key]
        candidate[key] = torch.lerp(value, tensor.float(), weight) if value.is_floating_point() else value
    return candidate


def _with_score(ingredient: Ingredient, score: float) -> Ingredient:
    return replace(ingredient, score=float(score))


class GreedyOptions(RecipeOptions):
    strict: bool = Field(False, description="Keep an ingredient only on a strict gain (the official code's '>').")
    combine: str = Field(
        "uniform", description="Recipe that builds each candidate from the kept ingredients (uniform: running mean)."
    )
    combine_options: dict[str, Any] = Field(
        default_factory=dict,
        validate_default=True,
        description="Options of the combine recipe (its defaults filled in).",
    )

    @field_validator("combine")
    @classmethod
    def _known_single_soup_recipe(cls, value: str) -> str:
        from soups.recipes import get_recipe  # the registry imports this module

        get_recipe(value)
        if value == "greedy":
            raise ValueError("greedy cannot combine with itself")
        return value

    @field_validator("combine_options")
    @classmethod
    def _options_of_combine(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        from soups.recipes import recipe_options

        combine = info.data.get("combine")
        if combine is None:  # combine itself was invalid; that error is reported
            return value
        if combine == "uniform":
            if value:
                raise ValueError("combine_options are for other recipes; uniform is greedy's own running mean")
            return value
        return recipe_options(combine, value).model_dump(mode="json")


class GreedyDetails(RecipeDetails):
    heldout_score: float
    strict: bool
    combine: str
    evaluations: int
    trajectory: list[GreedyStep]
    combine_options: dict[str, Any] | None = None
    """The combine recipe's options (absent for the running mean)."""


def greedy_recipe(ingredients: list[Ingredient], inputs: RecipeInputs, options: GreedyOptions) -> list[Dish]:
    combine = None if options.combine == "uniform" else _combine_with(options, inputs)
    result = greedy_soup(ingredients, inputs.evaluate, strict=options.strict, combine=combine)
    details = GreedyDetails(
        heldout_score=result.score,
        strict=options.strict,
        combine=options.combine,
        evaluations=result.evaluations,
        trajectory=result.trajectory,
        combine_options=options.combine_options if combine is not None else None,
    )
    (name,) = _dish_names(options)
    return [Dish(name, "greedy", result.accepted, state_dict=result.state_dict, details=details)]


def _dish_names(options: GreedyOptions) -> list[str]:
    return ["greedy" if options.combine == "uniform" else f"greedy_{options.combine}"]


def _combine_with(options: GreedyOptions, inputs: RecipeInputs) -> Combine:
    """Candidates cooked by recipe ``options.combine``, which must give one soup (a state dict)."""
    from soups.recipes import get_recipe, recipe_options

    recipe = get_recipe(options.combine)
    inputs.require(f"greedy with combine={options.combine}", *recipe.needs)
    settings = recipe_options(options.combine, options.combine_options)

    def combine(ingredients: list[Ingredient]) -> StateDict:
        dishes = recipe.cook(ingredients, inputs, settings)
        if len(dishes) != 1 or dishes[0].state_dict is None:
            raise ValueError(f"greedy combine={options.combine!r} must cook one soup (a state dict) per candidate")
        return dishes[0].state_dict

    return combine


def trajectory_figure(details: GreedyDetails, ingredients: list[str]) -> dict[str, Any]:
    """Held-out score of each candidate soup, in the order the greedy recipe tried them."""
    trajectory = details.trajectory
    fig, ax = canvas(7, 4)
    steps = range(1, len(trajectory) + 1)
    ax.plot(steps, [s.ingredient_score for s in trajectory], "o-", c="0.6", label="ingredient alone")
    colours = ["tab:green" if s.accepted else "tab:red" for s in trajectory]
    ax.scatter(
        steps,
        [s.candidate_score for s in trajectory],
        c=colours,
        s=60,
        zorder=3,
        label="soup with it (green: kept, red: dropped)",
    )
    ax.set_xticks(list(steps), [s.ingredient for s in trajectory], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"greedy soup trajectory (best ingredient first, candidates by {details.combine})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return {"trajectory": fig}


RECIPE = Recipe(
    "greedy",
    greedy_recipe,
    GreedyOptions,
    "best-first, keep an ingredient if held-out holds up",
    needs=("evaluate",),
    dish_names=_dish_names,
    details=GreedyDetails,
    variants=(
        {"label": "greedy_ties", "options": {"combine": "ties"}},
        {"label": "greedy_task_arithmetic", "options": {"combine": "task_arithmetic"}},
    ),
    figures=trajectory_figure,
    paper_row=3,
    published={"vit-b32": (81.03, 50.75)},
    compared_with=("best_single", "uniform"),
)
