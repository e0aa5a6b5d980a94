"""Fine-tuning one ingredient the way the paper did: end to end from the zero-shot classifier, AdamW, cosine
schedule with warm-up, gradient clipping, label smoothing, mixup and timm's RandAugment.

What every trial of one (model, dataset) shares -- the zero-shot start and the decoded train and held-out
splits -- is built once by `prepare_finetune` and handed to each `finetune` call, which trains a copy. The
train split is decoded once into uint8 tensors; each epoch only augments and normalises them, which is what
makes a CPU run of a tiny model take seconds instead of minutes. On CUDA: bfloat16 autocast, channels-last
inputs and pinned host memory.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from soups.config import DataConfig, FinetuneConfig, ModelConfig, TrainConfig
from soups.data import DatasetBundle, load_dataset
from soups.evaluate import evaluate
from soups.images import ImageSplit, Preprocess, cached_or_streamed, decode
from soups.models import ClipClassifier, build_classifier, save_classifier
from soups.runtime import determinism_record, resolve_device, use_cores, use_determinism
from soups.train_input import TrainImages, augmentation_workers, epoch_batches


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite: the run is useless as an ingredient and must not be registered."""


@dataclass(frozen=True)
class EpochReport:
    epoch: int
    train_loss: float
    heldout_accuracy: float
    heldout_loss: float


EpochCallback = Callable[[EpochReport], None]
"""Called after every epoch; may raise (e.g. to prune a trial), which stops training."""


@dataclass
class FinetuneResult:
    checkpoint: Path
    metrics: dict[str, float]
    history: list[EpochReport] = field(default_factory=list)
    runtime: dict[str, str] = field(default_factory=dict)
    """What besides the config decided the numbers (`soups.runtime.determinism_record`)."""


def zero_shot_start(model: ModelConfig, bundle: DatasetBundle, device: torch.device | str = "cpu") -> ClipClassifier:
    """The shared start of every ingredient (and the zero-shot end of WiSE-FT).

    Built under a fixed seed, so even a random-init start is the same in every process: soups of
    ingredients fine-tuned from different inits collapse.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_classifier(model.name, model.pretrained, bundle.classnames, bundle.templates, device)


@dataclass(frozen=True)
class FinetuneInputs:
    """What every fine-tune of one (model, dataset) shares, built once by `prepare_finetune`: the zero-shot
    start (never trained itself; each run trains a copy), the train split, the decoded held-out split and the
    class names (what a packaged fine-tune answers with)."""

    model: ModelConfig
    data: DataConfig
    start: ClipClassifier
    preprocess: Preprocess
    train: TrainImages
    heldout: ImageSplit
    classnames: list[str]


def prepare_finetune(config: FinetuneConfig, device: torch.device | str = "cpu") -> FinetuneInputs:
    """Load the dataset and build the zero-shot start once for many runs; decode held-out, and train when it fits
    ``train.cache_bytes`` (otherwise each run streams it with ``train.workers`` processes)."""
    use_determinism(config.train.deterministic)  # before the first CUDA work: cuBLAS reads its workspace once
    bundle = load_dataset(config.data)
    start = zero_shot_start(config.model, bundle, device)
    preprocess = Preprocess.of(start)
    settings = config.train
    splits = cached_or_streamed([("heldout", bundle.heldout)], preprocess, settings.cache_bytes, settings.workers)
    fits = len(bundle.train) * preprocess.image_bytes() <= settings.cache_bytes
    train = TrainImages(bundle.train, decode(bundle.train, preprocess) if fits else None)
    return FinetuneInputs(config.model, config.data, start, preprocess, train, splits["heldout"], bundle.classnames)


def finetune(
    config: FinetuneConfig, inputs: FinetuneInputs, out: Path, on_epoch: EpochCallback | None = None
) -> FinetuneResult:
    """Fine-tune a copy of the shared start and write it to ``out`` (safetensors); returns held-out metrics."""
    if inputs.model != config.model or inputs.data != config.data:
        raise ValueError("finetune inputs were prepared for another model or dataset than this run's config")
    train = config.train
    use_cores(train.threads)
    use_determinism(train.deterministic)
    device = resolve_device(train.device)
    torch.manual_seed(train.seed)  # for modules that draw (dropout); CLIP's towers and the inputs never do
    classifier = copy.deepcopy(inputs.start).to(device)
    preprocess, train_set, heldout = inputs.preprocess, inputs.train, inputs.heldout
    zero_shot = evaluate(classifier, heldout, preprocess, batch_size=train.eval_batch_size, device=device)

    started = time.perf_counter()
    history = _train(classifier, train_set, heldout, preprocess, train, device, on_epoch)
    seconds = time.perf_counter() - started
    save_classifier(classifier.cpu(), out, {"finetune_config": config.model_dump_json()})
    final = history[-1]
    metrics = {
        "heldout_accuracy": final.heldout_accuracy,
        "heldout_loss": final.heldout_loss,
        "train_loss": final.train_loss,
        "zeroshot_heldout_accuracy": zero_shot.accuracy,
        "train_seconds": seconds,
        "train_images_per_second": len(train_set) * train.epochs / seconds,
    }
    runtime = determinism_record(device, augmentation_workers(train))
    return FinetuneResult(Path(out), metrics, history, runtime)


def _train(
    classifier: ClipClassifier,
    train_set: TrainImages,
    heldout: ImageSplit,
    preprocess: Preprocess,
    train: TrainConfig,
    device: torch.device,
    on_epoch: EpochCallback | None,
) -> list[EpochReport]:
    cuda = device.type == "cuda"
    classifier.to(device)
    if cuda:
        classifier.to(memory_format=torch.channels_last)
    steps_per_epoch = math.ceil(len(train_set) / train.batch_size)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(train.warmup_steps, steps_per_epoch * train.epochs)
    )
    next_epoch = epoch_batches(train_set, preprocess, train, pin=cuda)  # pinned: host-to-GPU copies overlap
    mixing = np.random.default_rng(train.seed)  # the run's own: other threads never draw from it
    history = []
    for epoch in range(1, train.epochs + 1):
        classifier.train()
        loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per step
        for batch, labels in next_epoch():
            batch = preprocess.normalize(batch.to(device, non_blocking=True))
            if cuda:
                batch = batch.contiguous(memory_format=torch.channels_last)
            loss = _step_loss(classifier, batch, labels.to(device, non_blocking=True), train, mixing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if train.grad_clip:
                torch.nn.utils.clip_grad_norm_(classifier.parameters(), train.grad_clip)
            optimizer.step()
            schedule.step()
            loss_sum += loss.detach() * len(labels)
        train_loss = float(loss_sum) / len(train_set)
        if not math.isfinite(train_loss):
            raise TrainingDivergedError(
                f"training loss became {train_loss} in epoch {epoch} (lr {train.lr:g}); "
                "lower the learning rate or enable gradient clipping"
            )
        held = evaluate(classifier, heldout, preprocess, batch_size=train.eval_batch_size, device=device)
        report = EpochReport(epoch, train_loss, held.accuracy, held.loss)
        history.append(report)
        if on_epoch is not None:
            on_epoch(report)
    return history


def _step_loss(
    classifier: ClipClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    train: TrainConfig,
    generator: np.random.Generator,
) -> torch.Tensor:
    """Cross-entropy with label smoothing, on a mixup of the batch when mixup is on."""
    device_type = images.device.type
    mixing = train.mixup_alpha > 0
    if mixing:
        lam = float(generator.beta(train.mixup_alpha, train.mixup_alpha))
        perm = torch.from_numpy(generator.permutation(len(labels))).to(images.device)
        images = lam * images + (1 - lam) * images[perm]
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type == "cuda" and train.bf16):
        logits = classifier(images).float()
    loss = F.cross_entropy(logits, labels, label_smoothing=train.label_smoothing)
    if mixing:
        loss = lam * loss + (1 - lam) * F.cross_entropy(logits, labels[perm], label_smoothing=train.label_smoothing)
    return loss


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor
