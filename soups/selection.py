"""The one order in which models are chosen on held-out data, used everywhere a choice is made: greedy's
ingredient order, the best single model (and WiSE-FT's fine-tuned end), grid points, the leaderboard and
promotion. Higher accuracy first, then lower held-out loss, then fewer ingredients (cheaper to explain),
then the lower registry version (the older model; a reigning champion keeps its place on a full tie).
Only held-out-derived numbers: test and the reported shift sets never choose."""

from __future__ import annotations

import math
from collections.abc import Sequence

from soups.checkpoint import Ingredient


def selection_key(
    accuracy: float, loss: float | None, ingredients: int = 1, version: int | str | None = None
) -> tuple[float, float, int, float]:
    """Sort key, higher is better; a missing loss or version ranks after a known one."""
    return (
        accuracy,
        -loss if loss is not None else -math.inf,
        -ingredients,
        -int(version) if version is not None else -math.inf,
    )


def ingredient_key(ingredient: Ingredient) -> tuple[float, float, int, float]:
    return selection_key(ingredient.score, ingredient.loss, 1, ingredient.origin.get("version"))


def best_first(ingredients: Sequence[Ingredient]) -> list[Ingredient]:
    """Ingredients ranked by `selection_key`; every ingredient must have a held-out score."""
    unscored = [i.name for i in ingredients if i.score is None]
    if unscored:
        raise ValueError(f"ingredients without a held-out score: {', '.join(unscored)}; score them first")
    return sorted(ingredients, key=ingredient_key, reverse=True)
