"""What every recipe takes and gives back."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from soups.checkpoint import Ingredient, StateDict

Evaluate = Callable[[StateDict], float]
"""Scores a state dict on the held-out set (higher is better), e.g. top-1 accuracy."""


@dataclass
class Kitchen:
    """What recipes may need beyond the ingredients; each recipe says which parts it requires."""

    evaluate: Evaluate | None = None
    module: nn.Module | None = None
    heldout: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None
    base: Path | None = None
    device: str = "cpu"

    def require(self, recipe: str, *parts: str) -> None:
        missing = [p for p in parts if getattr(self, p) is None]
        if missing:
            raise ValueError(f"recipe {recipe!r} needs kitchen.{', kitchen.'.join(missing)}; provide them to cook it")


@dataclass
class Dish:
    """A cooked candidate: a single state dict (a soup) or, for ensembles, a module that combines models."""

    name: str
    recipe: str
    ingredients: list[Ingredient]
    state_dict: StateDict | None = None
    model: nn.Module | None = None
    details: dict[str, Any] = field(default_factory=dict)


class Recipe(Protocol):
    def __call__(self, ingredients: list[Ingredient], kitchen: Kitchen, **options: Any) -> list[Dish]: ...


def best_ingredient(ingredients: Sequence[Ingredient]) -> Ingredient:
    """The ingredient with the highest held-out score; every ingredient must have one."""
    unscored = [i.name for i in ingredients if i.score is None]
    if unscored:
        raise ValueError(f"ingredients without a held-out score: {', '.join(unscored)}; score them first")
    return max(ingredients, key=lambda i: i.score)
