"""Ensemble baselines: the logit ensemble of every ingredient and the paper's greedy ensemble (N× the
inference cost of a soup for N members).

An ensemble holds its members as checkpoint files and one module: each member's weights are streamed into the
module in turn, so one model is in memory whatever N (the kitchen's evaluator scores it member by member,
summing logits per batch: `soups.evaluate.Evaluator.ensemble_metrics`)."""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel, Field
from torch import nn

from soups.checkpoint import Ingredient, ensure_finite, iter_tensors, load_checkpoint_into
from soups.recipes.base import Dish, NoOptions, Recipe, RecipeDetails, RecipeInputs, RecipeOptions
from soups.selection import best_first
from soups.statedict import load_ingredient


class LogitEnsemble(nn.Module):
    """The mean logits of member checkpoints, computed with one base module whose weights each member's replace in
    turn (the module is the caller's: it holds the last member's weights afterwards)."""

    def __init__(self, module: nn.Module, members: list[Path]) -> None:
        super().__init__()
        self.module = module
        self.members = members

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        total = None
        for path in self.members:
            logits = load_checkpoint_into(self.module, path)(images)
            total = logits if total is None else total + logits
        return total / len(self.members)


class EnsembleDetails(RecipeDetails):
    members: int


class EnsembleStep(BaseModel):
    ingredient: str
    candidate_score: float
    accepted: bool


class GreedyEnsembleDetails(EnsembleDetails):
    heldout_score: float
    trajectory: list[EnsembleStep]


def _ensemble_dish(name: str, members: list[Ingredient], inputs: RecipeInputs, details: EnsembleDetails) -> Dish:
    """The members checked finite now (one tensor at a time), read again whenever the ensemble runs; fp16 files
    are cast into the module's dtype as they are loaded, so they still run on CPU."""
    for member in members:
        for key, tensor in iter_tensors(member.path):
            ensure_finite(key, tensor, str(member.path))
    model = LogitEnsemble(inputs.module.to(inputs.device), [m.path for m in members])
    return Dish(name, name, members, model=model, details=details)


def logit_ensemble(ingredients: list[Ingredient], inputs: RecipeInputs, options: NoOptions) -> list[Dish]:
    return [_ensemble_dish("ensemble", ingredients, inputs, EnsembleDetails(members=len(ingredients)))]


class GreedyEnsembleOptions(RecipeOptions):
    strict: bool = Field(False, description="Keep a model only on a strict gain ('>') instead of '>='.")


def greedy_ensemble(ingredients: list[Ingredient], inputs: RecipeInputs, options: GreedyEnsembleOptions) -> list[Dish]:
    """The paper's greedy ensemble: models best-first by held-out score, each kept only if the held-out
    accuracy of the ensemble's mean logits does not drop. Each model's held-out logits are computed once."""
    ranked = best_first(ingredients)
    labels = inputs.heldout_labels
    total = inputs.heldout_logits(load_ingredient(ranked[0]))
    score = _accuracy(total, labels)
    accepted, trajectory = [ranked[0]], [EnsembleStep(ingredient=ranked[0].name, candidate_score=score, accepted=True)]
    for ingredient in ranked[1:]:
        candidate = total + inputs.heldout_logits(load_ingredient(ingredient))  # argmax of a sum = of a mean
        candidate_score = _accuracy(candidate, labels)
        keep = candidate_score > score if options.strict else candidate_score >= score
        if keep:
            total, score = candidate, candidate_score
            accepted.append(ingredient)
        trajectory.append(EnsembleStep(ingredient=ingredient.name, candidate_score=candidate_score, accepted=keep))
    details = GreedyEnsembleDetails(members=len(accepted), heldout_score=score, trajectory=trajectory)
    return [_ensemble_dish("greedy_ensemble", accepted, inputs, details)]


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=-1) == labels.to(logits.device)).float().mean())


RECIPE = Recipe(
    "ensemble",
    logit_ensemble,
    NoOptions,
    "mean of the ingredients' logits (N forward passes)",
    needs=("module",),
    details=EnsembleDetails,
    promotable=False,
    paper_row=6,
    published={"vit-b32": (81.19, 50.77)},
)
GREEDY_RECIPE = Recipe(
    "greedy_ensemble",
    greedy_ensemble,
    GreedyEnsembleOptions,
    "best-first, keep a model if the ensemble holds up",
    needs=("module", "heldout_logits", "heldout_labels"),
    details=GreedyEnsembleDetails,
    promotable=False,
    paper_row=7,
    published={"vit-b32": (81.90, 49.44)},
)
