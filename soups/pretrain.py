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

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from soups.checkpoint import save_state_dict
from soups.config import PipelineConfig, PretrainConfig
from soups.data import DatasetBundle, load_dataset
from soups.evaluate import evaluate
from soups.images import Preprocess, decode
from soups.models import Transform, build_classifier, create_clip
from soups.runtime import resolve_device, use_cores
from soups.train import warmup_cosine

MAX_LOGIT_SCALE = math.log(100.0)
"""CLIP clamps its learned temperature at 100 so the softmax cannot collapse to a hard argmax."""


@dataclass(frozen=True)
class PretrainResult:
    checkpoint: Path
    zero_shot_accuracy: float
    seconds: float


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


def _transformed(dataset: Dataset, transform: Transform) -> tuple[torch.Tensor, torch.Tensor]:
    """All images through ``transform`` (random crops drawn from torch's seeded RNG) plus their labels."""
    images, labels = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack([transform(im) for im in images]), torch.tensor(labels, dtype=torch.long)


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
    config: PretrainConfig,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """A randomly initialised open_clip model trained contrastively on captioned ``dataset`` (eval mode).

    Deterministic on CPU for a given seed: initialisation, crops, batch order and template choice all
    come from RNGs seeded here; the caller's global torch RNG state is restored afterwards.
    """
    if len(dataset) == 0:
        raise ValueError("contrastive pretraining needs at least one image")
    device = torch.device(device)
    use_cores()
    epochs, batch_size, seed = config.epochs, config.batch_size, config.seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, train_tf, _, _ = create_clip(model_name, None, device)
        captions = _caption_tokens(model_name, classnames, templates)
        order_rng = torch.Generator().manual_seed(seed)
        n = len(dataset)
        steps_per_epoch = max(1, n // batch_size)  # drop the ragged last batch: tiny batches are noisy
        total = epochs * steps_per_epoch
        optimizer = torch.optim.AdamW(
            _param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98), eps=1e-6
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.warmup_steps, total))
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
                if config.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
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
    config: PretrainConfig, model_name: str, bundle: DatasetBundle, out: Path, device: str | torch.device = "cpu"
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
    model = train_clip(model_name, bundle.pretrain, bundle.classnames, bundle.templates, config, device)
    metadata = {"model_name": model_name, "dataset": bundle.name, "pretrain_config": config.model_dump_json()}
    out = save_clip(model, Path(out), metadata)
    del model
    return PretrainResult(out, zero_shot_accuracy(model_name, out, bundle, device), time.perf_counter() - start)


def zero_shot_accuracy(model_name: str, checkpoint: Path, bundle: DatasetBundle, device: str | torch.device) -> float:
    """Held-out accuracy of the zero-shot classifier built from ``checkpoint``."""
    classifier = build_classifier(model_name, str(checkpoint), bundle.classnames, bundle.templates, device)
    preprocess = Preprocess.of(classifier)
    return evaluate(classifier, decode(bundle.heldout, preprocess), preprocess, device=device).accuracy


def pretrain_start(config: PipelineConfig) -> PretrainResult:
    """This config's offline start, pretrained now on its training device and written to `start_path`."""
    device = resolve_device(config.train.device)
    return pretrain(config.pretrain, config.model.name, load_dataset(config.data), start_path(config), device)


def start_path(config: PipelineConfig) -> Path:
    """Where this config's offline pretrained start lives; its name carries a hash of what produced it."""
    recipe = f"{config.model.name}|{config.data.model_dump_json()}|{config.pretrain.model_dump_json()}"
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    return (
        config.tracking.root / "pretrained" / f"{config.model.name}-{config.data.name}-{digest}.safetensors"
    ).resolve()


def has_start(config: PipelineConfig) -> bool:
    """Whether a resolved config has the start its ingredients were fine-tuned from: weights, or random init
    by choice. Without one (imported fine-tunes, no pretrained weights given) nothing can be built from it."""
    return config.model.pretrained is not None or config.pretrain is None


def needs_offline_start(config: PipelineConfig) -> bool:
    """No pretrained weights are configured and the config asks for an offline pretrained start."""
    return config.model.pretrained is None and config.pretrain is not None


def with_resolved_start(config: PipelineConfig, missing_ok: bool = False) -> PipelineConfig:
    """The config whose ``model.pretrained`` names the start every fine-tune uses: the configured weights, else
    this config's offline pretrained checkpoint, which must exist (random init when ``pretrain`` is null).
    With ``missing_ok`` a missing offline start leaves ``model.pretrained`` null (see `has_start`)."""
    if not needs_offline_start(config):
        return config
    path = start_path(config)
    if not path.is_file() and missing_ok:
        return config
    if not path.is_file():
        raise FileNotFoundError(
            f"no pretrained start at {path}; run 'soups pretrain' (or 'soups run') first, or set model.pretrained"
        )
    return config.with_pretrained(str(path))
