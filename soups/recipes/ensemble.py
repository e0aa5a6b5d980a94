"""Logit ensemble baseline: average the raw logits of every ingredient (N× the inference cost of a soup)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call

from soups.checkpoint import Ingredient, StateDict
from soups.recipes import register
from soups.recipes.base import Dish, Kitchen
from soups.statedict import load_ingredient


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

    def to(self, *args, **kwargs) -> LogitEnsemble:
        super().to(*args, **kwargs)
        device = next(self.module.parameters()).device
        self.members = [{k: v.to(device) for k, v in m.items()} for m in self.members]
        return self


@register("ensemble")
def ensemble_recipe(ingredients: list[Ingredient], kitchen: Kitchen) -> list[Dish]:
    kitchen.require("ensemble", "module")
    members = [load_ingredient(i) for i in ingredients]
    model = LogitEnsemble(copy.deepcopy(kitchen.module), members).to(kitchen.device)
    return [Dish("ensemble", "ensemble", ingredients, model=model, details={"members": len(members)})]
