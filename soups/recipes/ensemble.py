"""Ensemble baselines: the logit ensemble of every ingredient and the paper's greedy ensemble (N× the
inference cost of a soup for N members)."""

from __future__ import annotations

import copy

import torch
from pydantic import BaseModel, Field
from torch import nn
from torch.func import functional_call

from soups.checkpoint import Ingredient, StateDict
from soups.recipes.base import Dish, NoOptions, Recipe, RecipeDetails, RecipeInputs, RecipeOptions
from soups.selection import best_first
from soups.statedict import load_ingredient, to_float32


class LogitEnsemble(nn.Module):
    """Runs one base module with each member's weights in turn and averages the logits."""

    def __init__(self, module: nn.Module, members: list[StateDict]) -> None:
        super().__init__()
        self.module = module
        self.members = members

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        total = None
        for state_dict in self.members:
            logits = functional_call(self.module, state_dict, (images,))
            total = logits if total is None else total + logits
        return total / len(self.members)

    def _apply(self, fn, recurse: bool = True):
        """.to()/.cuda()/.half() move and cast the members along with the module."""
        super()._apply(fn, recurse)
        self.members = [{k: fn(v) for k, v in m.items()} for m in self.members]
        return self


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
    weights = [to_float32(load_ingredient(i)) for i in members]  # fp16 files still run on CPU
    model = LogitEnsemble(copy.deepcopy(inputs.module), weights)
    model.to(device=inputs.device, dtype=next(inputs.module.parameters()).dtype)
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
