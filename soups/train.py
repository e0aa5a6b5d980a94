"""Fine-tuning one ingredient the way the paper did: end to end from the zero-shot classifier, AdamW, cosine
schedule with warm-up, gradient clipping, label smoothing, mixup and timm's RandAugment.

What every trial of one (model, dataset) shares -- the zero-shot start, the decoded train and held-out
splits and, for LP-FT (``train.init: linear_probe``), the linear probe's head -- is built once by
`prepare_finetune` and handed to each `finetune` call, which trains a copy. The
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
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from soups.config import DataConfig, FinetuneConfig, ModelConfig, TrainConfig
from soups.data import DatasetBundle, load_dataset
from soups.decoded import cached_decode
from soups.evaluate import evaluate
from soups.images import ImageSplit, Preprocess, StreamedImages, cached_or_streamed
from soups.models import ClipClassifier, build_classifier, save_classifier
from soups.probe import fit_head, head_accuracy, head_loss, image_features
from soups.runtime import determinism_record, resolve_device, use_cores, use_determinism
from soups.train_input import TrainImages, augmentation_workers, epoch_batches
from soups.training_state import EpochReport, TrainingState


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite: the run is useless as an ingredient and must not be registered."""


EpochCallback = Callable[[EpochReport], None]
"""Called after every epoch; may raise (e.g. to prune a trial), which stops training."""

StateCallback = Callable[[TrainingState], None]
"""Called with the run's state every ``train.checkpoint_every`` epochs (not after the last): where to keep it."""


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


ProbeSettings = tuple[int, tuple[float, ...]]
"""What a linear probe depends on besides the start and the train and held-out splits: (probe_steps,
probe_weight_decays)."""


def probe_settings(train: TrainConfig) -> ProbeSettings:
    return train.probe_steps, tuple(train.probe_weight_decays)


@dataclass(frozen=True)
class LinearProbe:
    """The head LP-FT starts from: fitted on frozen features of the train split, from the zero-shot head."""

    weight: torch.Tensor
    bias: torch.Tensor
    settings: ProbeSettings
    metrics: dict[str, float]
    """What a run records about it: zeroshot_/probe_train_accuracy (train features), zeroshot_/probe_heldout_
    accuracy and _loss (held-out features), probe_weight_decay (the one chosen), probe_train_images, probe_seconds."""


@dataclass(frozen=True)
class FinetuneInputs:
    """What every fine-tune of one (model, dataset) shares, built once by `prepare_finetune`: the zero-shot
    start (never trained itself; each run trains a copy), the train split, the decoded held-out split, the
    class names (what a packaged fine-tune answers with) and, when the config's ``train.init`` is
    linear_probe, the probe's head (`LinearProbe`) every LP-FT run starts from."""

    model: ModelConfig
    data: DataConfig
    start: ClipClassifier
    preprocess: Preprocess
    train: TrainImages
    heldout: ImageSplit
    classnames: list[str]
    probe: LinearProbe | None = None


def prepare_finetune(
    config: FinetuneConfig, device: torch.device | str = "cpu", decoded_cache: Path | None = None
) -> FinetuneInputs:
    """Load the dataset and build the zero-shot start once for many runs; decode held-out, and train when it fits
    ``train.cache_bytes`` (otherwise each run streams it with ``train.workers`` processes), through the machine's
    ``decoded_cache`` folder when given (`soups.decoded`: a process per trial decodes each split once per
    machine). With ``train.init: linear_probe`` also fit the linear probe once (`fit_linear_probe`): it depends
    only on the start, the train split and the probe settings, none of which a trial's sampled learning settings
    change."""
    use_determinism(config.train.deterministic)  # before the first CUDA work: cuBLAS reads its workspace once
    bundle = load_dataset(config.data)
    start = zero_shot_start(config.model, bundle, device)
    preprocess = Preprocess.of(start)
    settings = config.train
    decoder = partial(cached_decode, cache_dir=decoded_cache)
    splits = cached_or_streamed(
        [("heldout", bundle.heldout)], preprocess, settings.cache_bytes, settings.workers, decoder
    )
    fits = len(bundle.train) * preprocess.image_bytes() <= settings.cache_bytes
    train = TrainImages(bundle.train, decoder(bundle.train, preprocess) if fits else None)
    heldout = splits["heldout"]
    probe = None
    if settings.init == "linear_probe":
        probe = fit_linear_probe(start, train, heldout, preprocess, settings, torch.device(device))
    return FinetuneInputs(config.model, config.data, start, preprocess, train, heldout, bundle.classnames, probe)


def fit_linear_probe(
    start: ClipClassifier,
    train_set: TrainImages,
    heldout: ImageSplit,
    preprocess: Preprocess,
    train: TrainConfig,
    device: torch.device,
) -> LinearProbe:
    """LP of LP-FT: unit-norm features of the train and held-out splits from the frozen start (one pass each,
    eval preprocessing, no augmentation), then full-batch L-BFGS on the head from the zero-shot head for each of
    ``train.probe_weight_decays`` (`soups.probe`, shared with the linear-probe recipe); the decay with the lowest
    held-out cross-entropy wins (ties: the larger decay). Deterministic: nothing draws random numbers."""
    started = time.perf_counter()
    model = start.to(device)
    images = (
        train_set.decoded
        if train_set.decoded is not None
        else StreamedImages(train_set.dataset, preprocess, train.workers, train.prefetch)
    )
    features, labels = image_features(model, images, preprocess.normalize, train.eval_batch_size, device)
    held, held_labels = image_features(model, heldout, preprocess.normalize, train.eval_batch_size, device)
    zero_weight, zero_bias = model.head.weight.detach().float(), model.head.bias.detach().float()
    best = None
    for decay in sorted(train.probe_weight_decays, reverse=True):
        weight, bias = fit_head(features, labels, zero_weight, zero_bias, decay, train.probe_steps)
        loss = head_loss(held, held_labels, weight, bias)
        if best is None or loss < best[0]:
            best = (loss, decay, weight, bias)
    loss, decay, weight, bias = best
    metrics = {
        "zeroshot_train_accuracy": head_accuracy(features, labels, zero_weight, zero_bias),
        "probe_train_accuracy": head_accuracy(features, labels, weight, bias),
        "zeroshot_heldout_accuracy": head_accuracy(held, held_labels, zero_weight, zero_bias),
        "zeroshot_heldout_loss": head_loss(held, held_labels, zero_weight, zero_bias),
        "probe_heldout_accuracy": head_accuracy(held, held_labels, weight, bias),
        "probe_heldout_loss": loss,
        "probe_weight_decay": decay,
        "probe_train_images": float(len(labels)),
        "probe_seconds": time.perf_counter() - started,
    }
    dtype = model.head.weight.dtype
    return LinearProbe(weight.cpu().to(dtype), bias.cpu().to(dtype), probe_settings(train), metrics)


def _start_head(config: FinetuneConfig, inputs: FinetuneInputs, device: torch.device) -> LinearProbe | None:
    """The probe a run with ``init: linear_probe`` starts from: the shared one, or -- when this run's probe
    settings differ from those it was prepared with (sampled ``init`` or probe fields) -- its own."""
    train = config.train
    if train.init != "linear_probe":
        return None
    if inputs.probe is not None and inputs.probe.settings == probe_settings(train):
        return inputs.probe
    print(f"fitting this run's own linear probe (steps {train.probe_steps}, decays {train.probe_weight_decays})")
    start = copy.deepcopy(inputs.start)
    return fit_linear_probe(start, inputs.train, inputs.heldout, inputs.preprocess, train, device)


def finetune(
    config: FinetuneConfig,
    inputs: FinetuneInputs,
    out: Path,
    on_epoch: EpochCallback | None = None,
    on_state: StateCallback | None = None,
    resume: TrainingState | None = None,
) -> FinetuneResult:
    """Fine-tune a copy of the shared start and write it to ``out`` (safetensors); returns held-out metrics.
    With ``resume`` (a state of a run of this same config) training goes on at its next epoch and ends with the
    weights the uninterrupted run would have; ``on_epoch`` hears only the epochs trained here."""
    if inputs.model != config.model or inputs.data != config.data:
        raise ValueError("finetune inputs were prepared for another model or dataset than this run's config")
    if resume is not None and resume.config != config.model_dump_json():
        raise ValueError("the training state to resume was made with another config than this run's")
    train = config.train
    use_cores(train.threads)
    use_determinism(train.deterministic)
    device = resolve_device(train.device)
    torch.manual_seed(train.seed)  # for modules that draw (dropout); CLIP's towers and the inputs never do
    classifier = copy.deepcopy(inputs.start).to(device)
    start_metrics = resume.start_metrics if resume is not None else _start(classifier, config, inputs, device)
    started = time.perf_counter()
    history = _train(classifier, config, inputs, device, on_epoch, on_state, resume, start_metrics)
    seconds = time.perf_counter() - started
    save_classifier(classifier.cpu(), out, {"finetune_config": config.model_dump_json()})
    final = history[-1]
    trained = train.epochs - (resume.epoch if resume is not None else 0)
    metrics = {
        "heldout_accuracy": final.heldout_accuracy,
        "heldout_loss": final.heldout_loss,
        "train_loss": final.train_loss,
        **start_metrics,
        "train_seconds": seconds,
        "epochs_trained": float(trained),
        "train_images_per_second": len(inputs.train) * trained / seconds,
        **({} if resume is None else {"resumed_after_epoch": float(resume.epoch)}),
    }
    runtime = determinism_record(device, augmentation_workers(train))
    return FinetuneResult(Path(out), metrics, history, runtime)


def _start(classifier: ClipClassifier, config: FinetuneConfig, inputs: FinetuneInputs, device) -> dict[str, float]:
    """Put the start's head on ``classifier`` (LP-FT: the probe's) and measure it before the first epoch."""
    probe = _start_head(config, inputs, device)
    if probe is not None:
        with torch.no_grad():
            classifier.head.weight.copy_(probe.weight)
            classifier.head.bias.copy_(probe.bias)
    batch_size = config.train.eval_batch_size
    begin = evaluate(classifier, inputs.heldout, inputs.preprocess, batch_size=batch_size, device=device)
    zero_shot = begin.accuracy if probe is None else probe.metrics["zeroshot_heldout_accuracy"]
    return {
        "start_heldout_accuracy": begin.accuracy,
        "zeroshot_heldout_accuracy": zero_shot,
        **({} if probe is None else probe.metrics),
    }


def _train(
    classifier: ClipClassifier,
    config: FinetuneConfig,
    inputs: FinetuneInputs,
    device: torch.device,
    on_epoch: EpochCallback | None,
    on_state: StateCallback | None,
    resume: TrainingState | None,
    start_metrics: dict[str, float],
) -> list[EpochReport]:
    train, train_set, heldout, preprocess = config.train, inputs.train, inputs.heldout, inputs.preprocess
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
    history: list[EpochReport] = []
    if resume is not None:
        classifier.load_state_dict(resume.model)
        optimizer.load_state_dict(resume.optimizer)
        schedule.load_state_dict(resume.schedule)
        _set_generators(resume.generators, mixing)
        history = list(resume.history)
    for epoch in range(len(history) + 1, train.epochs + 1):
        classifier.train()
        loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per step
        for batch, labels in next_epoch(epoch):
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
        every = train.checkpoint_every
        if on_state is not None and every and epoch % every == 0 and epoch < train.epochs:
            on_state(
                TrainingState(
                    config=config.model_dump_json(),
                    epoch=epoch,
                    step=epoch * steps_per_epoch,
                    model={k: v.detach().cpu() for k, v in classifier.state_dict().items()},
                    optimizer=optimizer.state_dict(),
                    schedule=schedule.state_dict(),
                    generators=_generators(mixing),
                    history=list(history),
                    start_metrics=start_metrics,
                )
            )
    return history


def _generators(mixing: np.random.Generator) -> dict:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda, "mixup": mixing.bit_generator.state}


def _set_generators(generators: dict, mixing: np.random.Generator) -> None:
    torch.set_rng_state(generators["torch"])
    if generators["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(generators["cuda"])
    mixing.bit_generator.state = generators["mixup"]


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
