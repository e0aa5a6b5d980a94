"""Linear probing on frozen CLIP features: what the linear-probe baseline recipe and LP-FT fine-tuning share.

The image tower is frozen, so its unit-norm features of a split are computed once (one forward pass, no
augmentation: the model's eval preprocessing); fitting a head then costs only head steps. The head is fitted
by full-batch L-BFGS on the L2-regularised cross-entropy (CLIP's linear-probe protocol), starting from a
given head (the zero-shot one): nothing in it draws random numbers, so a fit on the CPU is bit-identical
for the same features, settings and thread count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

if TYPE_CHECKING:  # types only: the file-only path (soups cook, the merges) stays free of open_clip and timm
    from soups.images import ImageSplit
    from soups.models import ClipClassifier


@torch.no_grad()
def image_features(
    model: ClipClassifier,
    images: ImageSplit,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm float32 features (``model.features``, what the head sees) of every image, with their labels,
    both on ``device``; the model in eval mode, no autocast."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    features, labels = [], []
    for batch, batch_labels in images.batches(batch_size):
        features.append(model.features(normalize(batch.to(device, non_blocking=True))).float())
        labels.append(batch_labels.to(device))
    model.train(was_training)
    return torch.cat(features), torch.cat(labels)


def fit_head(
    features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, decay: float, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-batch L-BFGS (``steps`` iterations, strong-Wolfe line search) on the cross-entropy plus
    ``decay / 2 * |W|^2``, starting from the given head; returns the new float32 (weight, bias)."""
    weight = weight.detach().clone().float().requires_grad_(True)
    bias = bias.detach().clone().float().requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(F.linear(features, weight, bias), labels) + 0.5 * decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


@torch.no_grad()
def head_accuracy(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> float:
    """Top-1 accuracy of a head on precomputed features."""
    logits = F.linear(features, weight.to(features), bias.to(features))
    return float((logits.argmax(dim=1) == labels).float().mean())


@torch.no_grad()
def head_loss(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> float:
    """Mean cross-entropy of a head on precomputed features."""
    return float(F.cross_entropy(F.linear(features, weight.to(features), bias.to(features)), labels))
