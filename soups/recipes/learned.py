"""Learned soup: mixing weights softmax(alpha) and a logit scale trained on held-out images.

Global mixing learns one alpha per ingredient; by-layer mixing one per ingredient per tensor. The official
code rebuilt the mix from N state dicts on the CPU at every step; here each tensor's ingredients are stacked
once on the device (optionally in bfloat16) and the mixed weights are fed to one base module through
``torch.func.functional_call``, so no module is rebuilt and the mix is a single contraction per tensor.

The fit is the official `learned_bylayer.py`'s: AdamW (lr 0.05, wd 0) over the raw alphas (uniform start)
and a plain multiplier beta on the logits (start 1), batch 256, for a number of *epochs* over the fitting
set (5: about 500 steps on ImageNet's 26,000 held-out images), reshuffled every epoch by a seeded generator.
A budget in epochs means a small fitting set gets few steps and stays close to uniform, which is what the
data supports; a fixed step budget would fit a 90-image set 500 times over and collapse onto one model.
The final soup is re-averaged from the files in float32 with the learned coefficients.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from soups.checkpoint import (
    SAFETENSORS_DTYPES,
    Ingredient,
    StateDict,
    check_compatible,
    ensure_finite,
    iter_tensors,
)
from soups.figures import canvas
from soups.recipes.base import Dish, FitSet, Recipe, RecipeDetails, RecipeInputs, RecipeOptions
from soups.statedict import average_checkpoints


class LearnedOptions(RecipeOptions):
    epochs: int = Field(5, ge=1, description="Passes over the fitting set (the official fit: 5, batch 256).")
    lr: float = Field(0.05, gt=0, description="AdamW learning rate of alpha and beta (official: 0.05, wd 0).")
    batch_size: int = Field(256, ge=1, description="Images per step (the last batch of an epoch may be smaller).")
    seed: int = Field(0, description="Seed of the batch order.")
    stack_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype the stacked ingredients are held in while fitting (bfloat16 halves memory)."
    )

    @model_validator(mode="before")
    @classmethod
    def _steps_became_epochs(cls, value: Any) -> Any:
        if isinstance(value, dict) and "steps" in value:
            raise ValueError(
                f"the learned soup's budget is in epochs over the fitting set, as the official fit's (5); replace "
                f"steps: {value['steps']} with epochs (a step budget over-fits a small held-out set)"
            )
        return value


@dataclass
class LearnedMix:
    """Learned coefficients: [N] (global) or one [N] per tensor key (by layer), the logit multiplier beta and
    the loss of every step."""

    coefficients: torch.Tensor | dict[str, torch.Tensor]
    beta: float
    losses: list[float]


def stack_ingredients(
    paths: list, device: str | torch.device, dtype: torch.dtype | None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Stack each floating tensor of all ingredients into one [N, ...] tensor on the device, in ``dtype``
    (float32 by default).

    The stacks are allocated once in their final dtype and filled one file at a time, each tensor copied into
    its slot as it is read: the N ingredients are held once, as the stacks, plus one tensor of one open file
    (never an float32 [N, ...] intermediate when stacking in bfloat16, nor all N files mapped at once).
    Returns (stacked floating tensors, non-floating tensors taken from the first ingredient).
    """
    layout = check_compatible(paths)
    stacked = {
        key: torch.empty((len(paths), *spec.shape), dtype=dtype or torch.float32, device=device)
        for key, spec in layout.items()
        if SAFETENSORS_DTYPES[spec.dtype].is_floating_point
    }
    fixed: dict[str, torch.Tensor] = {}
    for index, path in enumerate(paths):
        for key, tensor in iter_tensors(Path(path)):
            if key in stacked:
                ensure_finite(key, tensor, str(path))
                stacked[key][index].copy_(tensor)
            elif index == 0:
                fixed[key] = tensor.to(device)
    return stacked, fixed


def mix(stacked: dict[str, torch.Tensor], weights: torch.Tensor | dict[str, torch.Tensor]) -> StateDict:
    """Contract each [N, ...] stack with its [N] weights; float32 output so the model runs as usual."""
    mixed = {}
    for key, stack in stacked.items():
        w = weights if isinstance(weights, torch.Tensor) else weights[key]
        mixed[key] = torch.tensordot(w.to(stack.dtype), stack, dims=1).float()
    return mixed


def learn_mixing(
    module: nn.Module,
    paths: list,
    fit: FitSet,
    options: LearnedOptions,
    *,
    by_layer: bool = False,
    device: str | torch.device = "cpu",
) -> LearnedMix:
    """Train softmax(alpha) mixing weights and the logit multiplier beta with AdamW (wd 0) for
    ``options.epochs`` passes over ``fit``, from a uniform mix and beta 1."""
    if len(fit) == 0:
        raise ValueError("a learned soup needs at least one fitting image")
    stack_dtype = torch.bfloat16 if options.stack_dtype == "bfloat16" else torch.float32
    stacked, fixed = stack_ingredients(paths, device, stack_dtype)
    module = module.to(device).eval()
    keys = list(stacked)
    alpha = torch.zeros((len(keys), len(paths)) if by_layer else (len(paths),), device=device, requires_grad=True)
    beta = torch.ones((), device=device, requires_grad=True)
    optimizer = torch.optim.AdamW([alpha, beta], lr=options.lr, weight_decay=0.0)
    order = torch.Generator().manual_seed(options.seed)
    losses: list[float] = []
    for _ in range(options.epochs):
        for images, labels in fit.batches(options.batch_size, order):  # a fresh permutation every epoch
            weights = _weights(alpha, keys, by_layer)
            logits = functional_call(module, {**mix(stacked, weights), **fixed}, (images.to(device),))
            loss = F.cross_entropy(beta * logits, labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    with torch.no_grad():
        final = _weights(alpha, keys, by_layer)
        coefficients = final.cpu() if isinstance(final, torch.Tensor) else {k: v.cpu() for k, v in final.items()}
    return LearnedMix(coefficients, float(beta.detach()), losses)


def _weights(alpha: torch.Tensor, keys: list[str], by_layer: bool) -> torch.Tensor | dict[str, torch.Tensor]:
    weights = torch.softmax(alpha, dim=-1)
    return dict(zip(keys, weights, strict=True)) if by_layer else weights


class LearnedDetails(RecipeDetails):
    coefficients: list[float] | dict[str, list[float]]
    """One weight per ingredient (global) or, per tensor key, one per ingredient (by layer)."""
    beta: float
    """The learned multiplier on the logits (fitting only: the soup itself is the mixed weights)."""
    epochs: int
    steps: int
    batch_size: int
    fit_images: int
    final_loss: float
    losses: list[float]

    def tags(self) -> dict[str, str]:
        return {"coefficients": json.dumps(self.coefficients)}

    def curves(self) -> dict[str, list[float]]:
        return {"fit_loss": self.losses}


def _learned_soup(name: str, by_layer: bool):
    def cook(ingredients: list[Ingredient], inputs: RecipeInputs, options: LearnedOptions) -> list[Dish]:
        paths = [i.path for i in ingredients]
        learned = learn_mixing(
            inputs.module, paths, inputs.fit_batches, options, by_layer=by_layer, device=inputs.device
        )
        coefficients = learned.coefficients
        details = LearnedDetails(
            coefficients=coefficients.tolist()
            if isinstance(coefficients, torch.Tensor)
            else {k: v.tolist() for k, v in coefficients.items()},
            beta=learned.beta,
            epochs=options.epochs,
            steps=len(learned.losses),
            batch_size=options.batch_size,
            fit_images=len(inputs.fit_batches),
            final_loss=learned.losses[-1],
            losses=learned.losses,
        )
        state_dict = average_checkpoints(paths, coefficients)
        return [Dish(name, name, ingredients, state_dict=state_dict, details=details)]

    return cook


def weights_figure(details: LearnedDetails, ingredients: list[str]) -> dict[str, Any]:
    """Learned soup weights: a bar per ingredient (global) or a heat map of tensors × ingredients (by layer)."""
    coefficients = details.coefficients
    if isinstance(coefficients, dict):
        keys = list(coefficients)
        fig, ax = canvas(max(5, len(ingredients) * 0.6), max(4, len(keys) * 0.12))
        image = ax.imshow([coefficients[k] for k in keys], aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(keys)), keys, fontsize=4)
        fig.colorbar(image, ax=ax, label="weight")
    else:
        fig, ax = canvas(7, 4)
        ax.bar(range(len(coefficients)), coefficients)
        ax.set_ylabel("weight")
    ax.set_xticks(range(len(ingredients)), ingredients, rotation=45, ha="right", fontsize=7)
    ax.set_title("learned soup mixing weights")
    fig.tight_layout()
    return {"weights": fig}


LEARNED = Recipe(
    "learned",
    _learned_soup("learned", by_layer=False),
    LearnedOptions,
    "softmax(alpha) per ingredient, fit on held-out",
    needs=("module", "fit_batches"),
    details=LearnedDetails,
    figures=weights_figure,
    paper_row=4,
    published={"vit-b32": (80.89, 51.07)},
    compared_with=("uniform",),
)
LEARNED_BY_LAYER = Recipe(
    "learned_by_layer",
    _learned_soup("learned_by_layer", by_layer=True),
    LearnedOptions,
    "softmax(alpha) per ingredient per tensor, fit on held-out",
    needs=("module", "fit_batches"),
    details=LearnedDetails,
    figures=weights_figure,
    paper_row=5,
    published={"vit-b32": (81.37, 50.87)},
)
