"""Learned soup: mixing weights softmax(alpha) and a logit scale trained on the held-out set.

Global mixing learns one alpha per ingredient; by-layer mixing one per ingredient per tensor. The official
code rebuilt the mix from N state dicts on the CPU at every step; here each tensor's ingredients are stacked
once on the device (optionally in bfloat16) and the mixed weights are fed to one base module through
``torch.func.functional_call``, so no module is rebuilt and the mix is a single contraction per tensor.
The final soup is re-averaged from the files in float32 with the learned coefficients.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from safetensors import safe_open
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from soups.checkpoint import Ingredient, StateDict, check_compatible, ensure_finite
from soups.recipes import register
from soups.recipes.base import Dish, Kitchen
from soups.statedict import average_checkpoints


@dataclass
class LearnedMix:
    """Learned coefficients: [N] (global) or one [N] per tensor key (by layer), plus the logit scale."""

    coefficients: torch.Tensor | dict[str, torch.Tensor]
    logit_scale: float
    losses: list[float]


def stack_ingredients(
    paths: list, device: str | torch.device, dtype: torch.dtype | None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Stack each floating tensor of all ingredients into one [N, ...] tensor on the device.

    Returns (stacked floating tensors, non-floating tensors taken from the first ingredient).
    """
    layout = check_compatible(paths)
    handles = [safe_open(str(p), framework="pt") for p in paths]
    stacked: dict[str, torch.Tensor] = {}
    fixed: dict[str, torch.Tensor] = {}
    for key in layout:
        tensors = [h.get_tensor(key) for h in handles]
        if not tensors[0].is_floating_point():
            fixed[key] = tensors[0].to(device)
            continue
        for path, tensor in zip(paths, tensors, strict=True):
            ensure_finite(key, tensor, str(path))
        stacked[key] = torch.stack(tensors).to(device=device, dtype=dtype or torch.float32)
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
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    by_layer: bool = False,
    epochs: int = 5,
    lr: float = 0.05,
    stack_dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> LearnedMix:
    """Train softmax(alpha) mixing weights and a logit scale with AdamW (wd 0), from a uniform start."""
    stacked, fixed = stack_ingredients(paths, device, stack_dtype)
    module = module.to(device).eval()
    n = len(paths)
    keys = list(stacked)
    alpha = torch.zeros((len(keys), n) if by_layer else (n,), device=device, requires_grad=True)
    log_scale = torch.zeros((), device=device, requires_grad=True)
    optimizer = torch.optim.AdamW([alpha, log_scale], lr=lr, weight_decay=0.0)
    losses: list[float] = []
    for _ in range(epochs):
        for images, labels in batches:
            weights = _weights(alpha, keys, by_layer)
            logits = functional_call(module, {**mix(stacked, weights), **fixed}, (images.to(device),))
            loss = F.cross_entropy(logits * log_scale.exp(), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    with torch.no_grad():
        final = _weights(alpha, keys, by_layer)
        coefficients = final.cpu() if isinstance(final, torch.Tensor) else {k: v.cpu() for k, v in final.items()}
    return LearnedMix(coefficients, float(log_scale.detach().exp()), losses)


def _weights(alpha: torch.Tensor, keys: list[str], by_layer: bool) -> torch.Tensor | dict[str, torch.Tensor]:
    weights = torch.softmax(alpha, dim=-1)
    return dict(zip(keys, weights, strict=True)) if by_layer else weights


def _learned_recipe(name: str, by_layer: bool):
    def recipe(
        ingredients: list[Ingredient],
        kitchen: Kitchen,
        epochs: int = 5,
        lr: float = 0.05,
        stack_dtype: torch.dtype | None = None,
    ) -> list[Dish]:
        kitchen.require(name, "module", "heldout")
        paths = [i.path for i in ingredients]
        learned = learn_mixing(
            kitchen.module,
            paths,
            kitchen.heldout,
            by_layer=by_layer,
            epochs=epochs,
            lr=lr,
            stack_dtype=stack_dtype,
            device=kitchen.device,
        )
        state_dict = average_checkpoints(paths, learned.coefficients)
        details = {
            "coefficients": learned.coefficients,
            "logit_scale": learned.logit_scale,
            "losses": learned.losses,
        }
        return [Dish(name, name, ingredients, state_dict=state_dict, details=details)]

    return recipe


register("learned")(_learned_recipe("learned", by_layer=False))
register("learned_by_layer")(_learned_recipe("learned_by_layer", by_layer=True))
