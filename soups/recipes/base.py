"""What every recipe takes and gives back, and how a recipe declares itself and its options."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from soups.checkpoint import Ingredient, StateDict
from soups.images import ImageSplit

Evaluate = Callable[[StateDict], float]
"""Scores a state dict on the held-out scoring split (higher is better), e.g. top-1 accuracy."""


@dataclass(frozen=True)
class FitSet:
    """Labelled images a learned soup fits its mixing weights on, batched on the device.

    ``prepare`` turns a stored batch into model inputs (the kitchen stores uint8 images and normalises
    per batch; tests pass ready float tensors and keep the identity).
    """

    images: torch.Tensor
    labels: torch.Tensor
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None
    device: str = "cpu"

    def __len__(self) -> int:
        return len(self.labels)

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass in ``batch_size`` chunks, reshuffled by ``generator`` when one is given."""
        order = torch.arange(len(self)) if generator is None else torch.randperm(len(self), generator=generator)
        for start in range(0, len(self), batch_size):
            index = order[start : start + batch_size]
            images = self.images[index].to(self.device)
            yield (self.prepare(images) if self.prepare else images), self.labels[index].to(self.device)


@dataclass
class RecipeInputs:
    """What recipes may need beyond the ingredients; each recipe says which parts it requires."""

    evaluate: Evaluate | None = None
    module: nn.Module | None = None
    fit_batches: FitSet | None = None
    base: Path | None = None
    device: str = "cpu"
    heldout_logits: Callable[[StateDict], torch.Tensor] | None = None
    """Logits of a state dict on the held-out scoring split (what the greedy ensemble combines)."""
    heldout_labels: torch.Tensor | None = None
    train_images: ImageSplit | None = None
    """The train split as uint8 batches (the linear probe's features come from it)."""
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None
    """uint8 batch on the device -> model input."""

    def missing(self, parts: Sequence[str]) -> list[str]:
        return [p for p in parts if getattr(self, p) is None]

    def require(self, recipe: str, *parts: str) -> None:
        missing = self.missing(parts)
        if missing:
            raise ValueError(f"recipe {recipe!r} needs inputs.{', inputs.'.join(missing)}; provide them to cook it")


@dataclass
class Dish:
    """A cooked candidate: a single state dict (a soup) or, for ensembles, a module that combines models."""

    name: str
    recipe: str
    ingredients: list[Ingredient]
    state_dict: StateDict | None = None
    model: nn.Module | None = None
    details: dict[str, Any] = field(default_factory=dict)


class RecipeOptions(BaseModel):
    """A recipe's settings with their defaults; unknown names are errors, so a typo never cooks the default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoOptions(RecipeOptions):
    """For recipes without settings."""


@dataclass(frozen=True)
class Recipe:
    """A named way to combine ingredients, the options it accepts, and the function that cooks it."""

    name: str
    cook: Callable[[list[Ingredient], RecipeInputs, Any], list[Dish]]
    options: type[RecipeOptions] = NoOptions
    summary: str = ""
    needs: tuple[str, ...] = ()
    """Parts of `RecipeInputs` it cannot cook without (checked before it runs)."""
    min_ingredients: int = 1
    """Fewer ingredients than this and the kitchen skips it with a note (Model Stock measures pairs)."""
    dish_names: Callable[[Any], list[str]] | None = None
    """The names of the dishes it cooks with given options, when they are not just its own name (one per
    WiSE-FT alpha, greedy after its combine recipe): what the kitchen's labels and stored names come from."""

    def names(self, options: RecipeOptions) -> list[str]:
        return self.dish_names(options) if self.dish_names else [self.name]


def best_ingredient(ingredients: Sequence[Ingredient]) -> Ingredient:
    """The ingredient with the highest held-out score; every ingredient must have one."""
    unscored = [i.name for i in ingredients if i.score is None]
    if unscored:
        raise ValueError(f"ingredients without a held-out score: {', '.join(unscored)}; score them first")
    return max(ingredients, key=lambda i: i.score)
