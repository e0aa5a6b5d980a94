"""The fine-tuning input pipeline: the paper's train transform, fed from memory or streamed from disk.

The train transform is timm's RandAugment (``rand-m{M}-n{N}``) behind a random resized crop at the model's
resolution and a horizontal flip where the dataset allows it (``train.crop_scale``, ``train.hflip``).
A train split that fits ``train.cache_bytes`` is decoded once; a larger one is decoded batch by batch. Either
way every augmented image is made in ``train.workers`` DataLoader processes (at least one), never in the
training process: timm and torchvision draw from process-global generators (Python's ``random``, numpy's,
torch's), which other threads of a sweep's process also draw from (Prefect's websocket client masks every
frame with ``random.getrandbits``), so augmenting there made a rerun of the same trial differ.

An epoch is a pure function of (``train.seed``, epoch number): its order is drawn from a generator seeded by
both, and before each image is augmented the worker seeds Python's, numpy's and torch's generators from
(seed, epoch, index). So epoch k comes out the same whether the trial ran epochs 1..k-1 in this process or
resumed from a checkpoint in another one, and whatever ``train.workers`` is. Without augmentation, a decoded
split is batched in the training process (nothing random but the order), the same batches as streaming.
From memory the crop acts on the already centre-cropped image; streamed, on the whole image, as the paper's runs did.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from soups.config import TrainConfig
from soups.images import ImageTensors, Preprocess, Transformed, labels_of

Augment = Callable[[object], torch.Tensor]
"""PIL image in, augmented uint8 [3, S, S] tensor out."""


def randaugment_transform(magnitude: int, ops: int, preprocess: Preprocess):
    """timm's RandAugment exactly as the paper's sweep named it, ``rand-m{M}-n{N}``: N ops drawn per image, each
    applied with probability 0.5 at magnitude M out of 10 (timm clips M > 10, so the sweep's M 1..20 keeps
    its meaning), with timm's training hparams for the model's input size and mean."""
    from timm.data import rand_augment_transform

    hparams = {
        "translate_const": int(preprocess.size * 0.45),
        "img_mean": tuple(min(255, round(255 * m)) for m in preprocess.mean),
    }
    transform = rand_augment_transform(f"rand-m{magnitude}-n{ops}", hparams)
    for op in transform.ops:
        if op.name == "Posterize":
            op.aug_fn = _posterize
    return transform


def _posterize(image, bits: int, **_):
    """timm's Posterize keeps int(M / 10 * 4) bits, so 0 bits for M < 2.5; the Pillow of the paper's runs turned
    that into a black image, today's Pillow raises. Keep the paper's behaviour."""
    from PIL import Image, ImageOps

    if bits >= 8:
        return image
    return ImageOps.posterize(image, bits) if bits > 0 else Image.new(image.mode, image.size)


def train_transform(preprocess: Preprocess, train: TrainConfig) -> Augment | None:
    """PIL -> crop (random resized, or resize + centre) -> flip -> RandAugment -> uint8 tensor; None when no
    augmentation is on (then the eval decoding is the train decoding)."""
    if train.crop_scale is None and not train.hflip and not train.randaugment_n:
        return None
    mode = v2.InterpolationMode(preprocess.interpolation)
    steps = [
        v2.RandomResizedCrop(preprocess.size, scale=train.crop_scale, interpolation=mode, antialias=True)
        if train.crop_scale
        else preprocess.resize()
    ]
    if train.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if train.randaugment_n:
        steps.append(randaugment_transform(train.randaugment_m, train.randaugment_n, preprocess))
    return v2.Compose([*steps, v2.PILToTensor()])


@dataclass(frozen=True)
class TrainImages:
    """The train split: decoded once (``decoded``) when it fits the memory budget, else read from ``dataset``."""

    dataset: Dataset
    decoded: ImageTensors | None

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def labels(self) -> torch.Tensor:
        return self.decoded.labels if self.decoded is not None else labels_of(self.dataset)

    @property
    def streamed(self) -> bool:
        return self.decoded is None


def epoch_seed(*keys: int) -> int:
    """A 63-bit seed mixed from ``keys`` (seed, epoch[, index]) by numpy's SeedSequence: nearby keys give
    unrelated streams."""
    return int(np.random.SeedSequence([k & 0xFFFFFFFF for k in keys]).generate_state(2, np.uint64)[0] >> 1)


EpochBatches = Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]
"""Epoch number (1-based) in, that epoch's (uint8 images, labels) batches out."""


class EpochOrder(Sampler[tuple[int, int]]):
    """(epoch, index) pairs: a permutation seeded by (seed, epoch), for the epoch the caller last set."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 1

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        for index in torch.randperm(self.size, generator=order).tolist():
            yield self.epoch, index


def epoch_batches(images: TrainImages, preprocess: Preprocess, train: TrainConfig, pin: bool = False) -> EpochBatches:
    """A function giving epoch k's (uint8 images, labels) batches, the same in any process (module docstring)."""
    augment = train_transform(preprocess, train)
    if images.streamed:
        source = Transformed(images.dataset, augment or preprocess.decode_transform())
        return _loaded(_Seeded(source, train.seed), train, pin)
    if augment is not None:
        return _loaded(_Seeded(_AugmentedTensors(images.decoded, augment), train.seed), train, pin)
    decoded = images.decoded
    order = EpochOrder(len(decoded), train.seed)

    def epoch(number: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order.epoch = number
        for pairs in BatchSampler(order, train.batch_size, drop_last=False):
            index = [i for _, i in pairs]
            batch = decoded.images[index]
            yield (batch.pin_memory() if pin else batch), decoded.labels[index]

    return epoch


class _Seeded(Dataset):
    """Items fetched by (epoch, index), each made under generators seeded by (seed, epoch, index): timm and
    torchvision draw from the process-global ones, which this worker process owns."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key
        seed = epoch_seed(self.seed, epoch, index)
        random.seed(seed)
        np.random.seed(seed & 0xFFFFFFFF)
        torch.manual_seed(seed)
        return self.dataset[index]


class _AugmentedTensors(Dataset):
    """Decoded uint8 images augmented one by one (timm augments PIL images), in a worker process."""

    def __init__(self, decoded: ImageTensors, augment: Augment) -> None:
        self.decoded, self.augment = decoded, augment

    def __len__(self) -> int:
        return len(self.decoded)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = v2.functional.to_pil_image(self.decoded.images[index])
        return self.augment(image), int(self.decoded.labels[index])


def augmentation_workers(train: TrainConfig) -> int:
    """Worker processes that make a run's batches: ``train.workers``, at least one (see the module docstring)."""
    return max(1, train.workers)


def _loaded(dataset: _Seeded, train: TrainConfig, pin: bool) -> EpochBatches:
    order = EpochOrder(len(dataset), train.seed)
    with _workers_as_configured():
        loader = DataLoader(
            dataset,
            batch_sampler=BatchSampler(order, train.batch_size, drop_last=False),
            num_workers=augmentation_workers(train),
            persistent_workers=True,
            prefetch_factor=train.prefetch,
            pin_memory=pin,
            generator=torch.Generator().manual_seed(train.seed),  # never the training process's global one
        )

    def epoch(number: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order.epoch = number  # read when the iterator below draws its first batch indices
        with _workers_as_configured():
            return iter(loader)

    return epoch


@contextmanager
def _workers_as_configured() -> Iterator[None]:
    """More workers than cores is the config's choice (the augmentations depend on the count, not on the
    machine): no warning about it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        yield
