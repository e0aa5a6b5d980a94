"""Logit ensemble baseline: average the raw logits of every ingredient (N× the inference cost of a soup)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call

from soups.checkpoint import Ingredient, StateDict
from soups.recipes.base import Dish, NoOptions, Recipe, RecipeInputs
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


def logit_ensemble(ingredients: list[Ingredient], inputs: RecipeInputs, options: NoOptions) -> list[Dish]:
    inputs.require("ensemble", "module")
    members = [to_float32(load_ingredient(i)) for i in ingredients]  # fp16 files still run on CPU
    model = LogitEnsemble(copy.deepcopy(inputs.module), members)
    model.to(device=inputs.device, dtype=next(inputs.module.parameters()).dtype)
    return [Dish("ensemble", "ensemble", ingredients, model=model, details={"members": len(members)})]


RECIPE = Recipe("ensemble", logit_ensemble, NoOptions, "mean of the ingredients' logits (N forward passes)")
