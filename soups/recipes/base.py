"""What every recipe takes and gives back, and how a recipe declares itself and its options."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from soups.checkpoint import Ingredient, StateDict
from soups.selection import best_first

if TYPE_CHECKING:  # a type only: torchvision stays off the file-only path
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


class RecipeDetails(BaseModel):
    """What a recipe records about how it cooked one dish, typed per recipe (``Recipe.details``); stored as
    JSON (details.json, the kitchen's records) and read back into the same type."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def tags(self) -> dict[str, str]:
        """Registry-version tags (and parameters of the candidate's run) a reader filters on: none by default."""
        return {}

    def curves(self) -> dict[str, list[float]]:
        """Metric series logged on the candidate's run, one point per step (the learned soup's fit loss)."""
        return {}

    def as_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class NoDetails(RecipeDetails):
    """For recipes that record nothing beyond the dish itself."""


@dataclass
class Dish:
    """A cooked candidate: a single state dict (a soup) or, for ensembles, a module that combines models."""

    name: str
    recipe: str
    ingredients: list[Ingredient]
    state_dict: StateDict | None = None
    model: nn.Module | None = None
    details: RecipeDetails = field(default_factory=NoDetails)


class RecipeOptions(BaseModel):
    """A recipe's settings with their defaults; unknown names are errors, so a typo never cooks the default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoOptions(RecipeOptions):
    """For recipes without settings."""


Figures = Callable[[Any, list[str]], dict[str, Any]]
"""(a dish's details, its ingredients' names) -> {file-name suffix: matplotlib figure}."""


@dataclass(frozen=True)
class Sweep:
    """A recipe whose dishes are points along one axis (WiSE-FT's α). They are drawn as one line starting at
    ``origin`` (the label of the axis' start, a dish of another recipe, when it was cooked), and only the best
    point by held-out counts: it alone is promoted and stands for the recipe in the paper's table."""

    legend: str
    origin: str | None = None


@dataclass(frozen=True)
class Recipe:
    """A named way to combine ingredients and everything the kitchen needs to know about it: the options it
    accepts, the function that cooks it, what it records (``details``), its default grid, its figures, where
    it sits in the paper's table and whether its dishes may be promoted. Nothing outside its module switches
    on its name."""

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

    details: type[RecipeDetails] = NoDetails
    """The type of each dish's details (how the kitchen reads its records back)."""
    default_grid: dict[str, list[Any]] = field(default_factory=dict)
    """Option values the default kitchen tunes on the held-out scoring split."""
    variants: tuple[dict[str, Any], ...] = ()
    """Further entries of the default kitchen ({label, options}), cooked after every recipe's plain entry."""
    figures: Figures | None = None
    """The figures of one dish, logged beside the leaderboard as ``<stored name>_<suffix>.png``."""
    sweep: Sweep | None = None
    promotable: bool = True
    """Whether its dishes may become registry versions and champions (ensembles cost N forward passes)."""
    paper_row: int | None = None
    """Position of its row in the paper's Table 1 (ViT-B/32 on ImageNet); None: not a row there."""
    published: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Per paper preset (`kitchen.paper`), the paper's (ImageNet top-1, mean over the 5 shifts) in % for its
    plain entry, printed beside ours in report.md."""
    compared_with: tuple[str, ...] = ()
    """Labels of the rows the paper reports it beating; the reproduction report says whether the data resolves
    each comparison."""

    def names(self, options: RecipeOptions) -> list[str]:
        return self.dish_names(options) if self.dish_names else [self.name]

    def cannot_cook(self, inputs: RecipeInputs, ingredients: int) -> str | None:
        """Why a kitchen skips it with these inputs and this many ingredients; None when it can cook."""
        missing = inputs.missing(self.needs)
        if missing:
            return f"needs {', '.join(missing)}"
        if ingredients < self.min_ingredients:
            return f"needs at least {self.min_ingredients} ingredients, {ingredients} gathered"
        return None

    def default_names(self) -> list[str]:
        """The labels of what its plain entry (default options, no label) cooks."""
        return self.names(self.options())


def best_ingredient(ingredients: Sequence[Ingredient]) -> Ingredient:
    """The first ingredient in `soups.selection` order (held-out accuracy, then loss, then version)."""
    return best_first(ingredients)[0]
