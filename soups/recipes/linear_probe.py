"""Linear-probe baseline (the paper's LP reference row): the zero-shot image tower frozen, a new linear head
trained to convergence on its features of the train split (L-BFGS on the L2-regularised logistic loss, CLIP's
protocol), the L2 strength chosen on the held-out scoring split.

The head starts from the zero-shot head and sees unit-norm features, like every ingredient's head, so the
result is a checkpoint of the same architecture: it is scored, registered and served like a soup. Features
are computed once; each weight decay then costs only head steps.
"""

from __future__ import annotations

import copy

import torch
from pydantic import Field

from soups.checkpoint import Ingredient, StateDict
from soups.probe import fit_head, image_features
from soups.recipes.base import Dish, Recipe, RecipeDetails, RecipeInputs, RecipeOptions
from soups.statedict import load_ingredient


class LinearProbeOptions(RecipeOptions):
    weight_decays: list[float] = Field(
        default_factory=lambda: [0.0, 1e-4, 1e-3, 1e-2, 1e-1],
        min_length=1,
        description="L2 penalties (wd/2 * |W|^2) tried; the held-out scoring split picks one.",
    )
    steps: int = Field(200, ge=1, description="L-BFGS iterations on the cached features per penalty.")
    batch_size: int = Field(512, ge=1, description="Images per forward pass while computing the features.")


@torch.no_grad()
def train_features(inputs: RecipeInputs, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, StateDict]:
    """Unit-norm features of the train split from the zero-shot start, their labels, and the start's weights."""
    start = load_ingredient(Ingredient(inputs.base, name="zero-shot"))
    model = copy.deepcopy(inputs.module).to(inputs.device).eval()
    model.load_state_dict(start)
    features, labels = image_features(model, inputs.train_images, inputs.normalize, batch_size, inputs.device)
    return features, labels, start


class LinearProbeDetails(RecipeDetails):
    weight_decay: float
    """The decay chosen on held-out."""
    curve: list[dict[str, float]]
    train_images: int
    steps: int


def linear_probe(ingredients: list[Ingredient], inputs: RecipeInputs, options: LinearProbeOptions) -> list[Dish]:
    features, labels, start = train_features(inputs, options.batch_size)
    zero_weight, zero_bias = start["head.weight"].to(inputs.device), start["head.bias"].to(inputs.device)
    best, best_score, curve = None, float("-inf"), []
    for decay in options.weight_decays:
        weight, bias = fit_head(features, labels, zero_weight, zero_bias, decay, options.steps)
        state = {**start, "head.weight": weight.cpu().to(start["head.weight"].dtype), "head.bias": bias.cpu()}
        score = float(inputs.evaluate(state))
        curve.append({"weight_decay": decay, "heldout": score})
        if score > best_score:
            best, best_score, chosen = state, score, decay
    details = LinearProbeDetails(weight_decay=chosen, curve=curve, train_images=len(labels), steps=options.steps)
    return [Dish("linear_probe", "linear_probe", [], state_dict=best, details=details)]


RECIPE = Recipe(
    "linear_probe",
    linear_probe,
    LinearProbeOptions,
    "zero-shot image tower frozen, a new head trained on train features (reference row)",
    needs=("module", "base", "train_images", "normalize", "evaluate"),
    details=LinearProbeDetails,
    paper_row=9,
)
