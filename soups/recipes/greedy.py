"""Greedy soup: add ingredients best-first, keeping each only if the held-out score holds up.

The paper keeps an ingredient when the soup's held-out accuracy "does not decrease" (``>=``, the default);
the official code keeps it only when it strictly increases (``strict=True``). The soup is a running average,
candidate = soup·n/(n+1) + new/(n+1), so accepted ingredients are never re-summed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pydantic import Field

from soups.checkpoint import Ingredient, StateDict
from soups.recipes.base import Dish, Evaluate, Recipe, RecipeInputs, RecipeOptions
from soups.statedict import blend, cast_like, load_ingredient, to_float32


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


def greedy_soup(ingredients: list[Ingredient], evaluate: Evaluate, *, strict: bool = False) -> GreedyResult:
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
    ranked = sorted(scored, key=lambda i: i.score, reverse=True)

    best = ranked[0]
    reference = load_ingredient(best)
    soup = to_float32(reference)
    accepted = [best]
    score = float(best.score)
    trajectory = [GreedyStep(best.name, score, score, True, 1)]
    for ingredient in ranked[1:]:
        candidate = blend(soup, load_ingredient(ingredient), 1.0 / (len(accepted) + 1))
        candidate_score = float(evaluate(candidate))
        evaluations += 1
        keep = candidate_score > score if strict else candidate_score >= score
        if keep:
            soup, score = candidate, candidate_score
            accepted.append(ingredient)
        trajectory.append(GreedyStep(ingredient.name, float(ingredient.score), candidate_score, keep, len(accepted)))
    return GreedyResult(cast_like(soup, reference), accepted, score, trajectory, evaluations)


def _with_score(ingredient: Ingredient, score: float) -> Ingredient:
    return Ingredient(ingredient.path, float(score), ingredient.name, ingredient.origin)


class GreedyOptions(RecipeOptions):
    strict: bool = Field(False, description="Keep an ingredient only on a strict gain (the official code's '>').")


def greedy_recipe(ingredients: list[Ingredient], inputs: RecipeInputs, options: GreedyOptions) -> list[Dish]:
    inputs.require("greedy", "evaluate")
    result = greedy_soup(ingredients, inputs.evaluate, strict=options.strict)
    details = {
        "heldout_score": result.score,
        "strict": options.strict,
        "evaluations": result.evaluations,
        "trajectory": [asdict(step) for step in result.trajectory],
    }
    return [Dish("greedy", "greedy", result.accepted, state_dict=result.state_dict, details=details)]


RECIPE = Recipe("greedy", greedy_recipe, GreedyOptions, "best-first, keep an ingredient if held-out holds up")
