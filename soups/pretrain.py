"""A pretrained CLIP start made offline: contrastive training of both towers on (image, caption) pairs.

Soups only work when every ingredient is fine-tuned from the same pretrained weights, and real CLIP
weights cannot be downloaded here. This trains an open_clip model on ``bundle.pretrain`` (images kept apart
from train/heldout/test), with captions made by filling a random prompt template with the class name, and
writes a full CLIP state dict that ``open_clip.create_model_and_transforms(name, pretrained=path)`` and
`soups.models.build_classifier` load like any downloaded checkpoint.

With ten classes most pairs in a batch share a class, so CLIP's one-hot contrastive targets would push an
image away from captions that describe it equally well (false negatives). The targets here are
label-aware: each image's target is spread uniformly over the batch captions of its class, and each
caption's over the images of its class.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from soups.checkpoint import save_state_dict
from soups.config import PretrainConfig
from soups.data import DatasetBundle
from soups.models import Transform, build_classifier, create_clip

MAX_LOGIT_SCALE = math.log(100.0)
"""CLIP clamps its learned temperature at 100 so the softmax cannot collapse to a hard argmax."""


@dataclass(frozen=True)
class PretrainResult:
    checkpoint: Path
    zero_shot_accuracy: float
    seconds: float


@contextmanager
def cpu_threads() -> Iterator[int]:
    """Use every core this process may run on (one intra-op thread each), then restore the old setting."""
    previous = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores))
    try:
        yield cores
    finally:
        torch.set_num_threads(previous)


def label_aware_clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric CLIP loss whose targets are uniform over same-class pairs instead of the diagonal only.

    Same-class captions are true matches; treating them as negatives (plain CLIP loss) fights the signal
    and slows learning badly when a batch holds many images per class.
    """
    logits = logit_scale * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    image_to_text = F.cross_entropy(logits, targets)
    text_to_image = F.cross_entropy(logits.T, targets)  # `same` is symmetric, so are its row sums
    return (image_to_text + text_to_image) / 2


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; gains, biases, embeddings' scalars and the temperature stay undecayed."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to zero, as a factor of the base learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _transformed(dataset: Dataset, transform: Transform) -> tuple[torch.Tensor, torch.Tensor]:
    """All images through ``transform`` (random crops drawn from torch's seeded RNG) plus their labels."""
    images, labels = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack([transform(im) for im in images]), torch.tensor(labels, dtype=torch.long)


@torch.no_grad()
def accuracy(model: nn.Module, dataset: Dataset, transform: Transform, batch_size: int = 256) -> float:
    """Top-1 accuracy of a classifier (logits out) over a dataset of (PIL image, label)."""
    was_training = model.training
    model.eval()
    images, labels = _transformed(dataset, transform)
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(labels), batch_size):
        predicted = model(images[i : i + batch_size].to(device)).argmax(dim=1).cpu()
        correct += int((predicted == labels[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, len(labels))


def _caption_tokens(model_name: str, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """[n_classes, n_templates, context_length] tokens of every caption, tokenised once."""
    tokenizer = open_clip.get_tokenizer(model_name)
    texts = [template.format(name) for name in classnames for template in templates]
    return tokenizer(texts).reshape(len(classnames), len(templates), -1)


def train_clip(
    model_name: str,
    dataset: Dataset,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    weight_decay: float = 0.1,
    warmup_steps: int = 10,
    grad_clip: float | None = 1.0,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """A randomly initialised open_clip model trained contrastively on captioned ``dataset`` (eval mode).

    Deterministic on CPU for a given seed: initialisation, crops, batch order and template choice all
    come from RNGs seeded here; the caller's global torch RNG state is restored afterwards.
    """
    if len(dataset) == 0:
        raise ValueError("contrastive pretraining needs at least one image")
    device = torch.device(device)
    with cpu_threads(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, train_tf, _, _ = create_clip(model_name, None, device)
        captions = _caption_tokens(model_name, classnames, templates)
        order_rng = torch.Generator().manual_seed(seed)
        n = len(dataset)
        steps_per_epoch = max(1, n // batch_size)  # drop the ragged last batch: tiny batches are noisy
        total = epochs * steps_per_epoch
        optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine_lr(s, total, warmup_steps))
        model.train()
        for _ in range(epochs):
            images, labels = _transformed(dataset, train_tf)
            perm = torch.randperm(n, generator=order_rng)
            picks = torch.randint(len(templates), (n,), generator=order_rng)
            for step in range(steps_per_epoch):
                idx = perm[step * batch_size : (step + 1) * batch_size]
                batch_labels = labels[idx]
                tokens = captions[batch_labels, picks[idx]]
                image_features = model.encode_image(images[idx].to(device))
                text_features = model.encode_text(tokens.to(device))
                loss = label_aware_clip_loss(
                    image_features, text_features, batch_labels.to(device), model.logit_scale.exp()
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                optimizer.step()
                schedule.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    return model.eval()


def save_clip(model: nn.Module, out: Path, metadata: dict[str, str] | None = None) -> Path:
    """Full CLIP state dict as safetensors, written under a temporary name and renamed into place.

    The keys are open_clip's own, so ``create_model_and_transforms(name, pretrained=str(out))`` loads it.
    """
    return save_state_dict(model.state_dict(), Path(out), metadata)


def pretrain(
    model_name: str,
    bundle: DatasetBundle,
    out: Path,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    weight_decay: float = 0.1,
    warmup_steps: int = 10,
    grad_clip: float | None = 1.0,
    device: str | torch.device = "cpu",
) -> PretrainResult:
    """Train on ``bundle.pretrain``, save to ``out``, and score zero-shot on heldout (never test).

    The score comes from reloading ``out`` through `build_classifier`, so it also proves the file loads.
    """
    if bundle.pretrain is None or len(bundle.pretrain) == 0:
        raise ValueError(
            f"dataset {bundle.name!r} has no pretrain split; contrastive pretraining needs images kept apart "
            "from train/heldout/test (the digits dataset has one), or point model.pretrained at a checkpoint"
        )
    start = time.perf_counter()
    model = train_clip(
        model_name,
        bundle.pretrain,
        bundle.classnames,
        bundle.templates,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        grad_clip=grad_clip,
        device=device,
    )
    metadata = {"model_name": model_name, "dataset": bundle.name, "seed": str(seed), "epochs": str(epochs)}
    out = save_clip(model, Path(out), metadata)
    del model
    with cpu_threads():
        classifier, _, eval_tf = build_classifier(
            model_name, str(out), bundle.classnames, bundle.templates, device=device
        )
        zero_shot = accuracy(classifier, bundle.heldout, eval_tf)
    return PretrainResult(checkpoint=out, zero_shot_accuracy=zero_shot, seconds=time.perf_counter() - start)


def pretrain_with(
    config: PretrainConfig, model_name: str, bundle: DatasetBundle, out: Path, device: str = "cpu"
) -> PretrainResult:
    """`pretrain` driven by a validated `PretrainConfig`."""
    return pretrain(
        model_name,
        bundle,
        out,
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        seed=config.seed,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps,
        grad_clip=config.grad_clip,
        device=device,
    )
