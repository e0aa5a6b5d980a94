"""The fine-tuning input pipeline: the paper's train transform, fed from memory or streamed from disk.

The train transform is timm's RandAugment (``rand-m{M}-n{N}``) behind a random resized crop at the model's
resolution and a horizontal flip where the dataset allows it (``train.crop_scale``, ``train.hflip``).
A train split that fits ``train.cache_bytes`` decoded is decoded once and augmented per batch in the
training process (digits: seconds per run); a larger one is read by ``train.workers`` DataLoader processes
that decode and augment, so memory stays at about workers x prefetch x batch images. Both draw the epoch's
order from the same seeded generator, so with augmentation off they give the same batches. From memory the
crop acts on the already centre-cropped image; streamed, on the whole image, as the paper's runs did.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
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


class EpochOrder(Sampler[int]):
    """A fresh permutation per epoch from one seeded generator, drawn in the training process."""

    def __init__(self, size: int, generator: torch.Generator) -> None:
        self.size, self.generator = size, generator

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        yield from torch.randperm(self.size, generator=self.generator).tolist()


def epoch_batches(
    images: TrainImages, preprocess: Preprocess, train: TrainConfig, pin: bool = False
) -> Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """A function giving one epoch of (uint8 images, labels) batches per call, in a seeded order."""
    order = torch.Generator().manual_seed(train.seed)
    augment = train_transform(preprocess, train)
    if images.streamed:
        return _streamed(images.dataset, augment or preprocess.decode_transform(), order, train, pin)
    random.seed(train.seed)  # timm's RandAugment draws from Python's and numpy's global generators
    np.random.seed(train.seed % 2**32)
    decoded = images.decoded

    def epoch() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for index in BatchSampler(EpochOrder(len(decoded), order), train.batch_size, drop_last=False):
            batch = decoded.images[index]
            if augment is not None:  # per image, as timm augments PIL images
                batch = torch.stack([augment(v2.functional.to_pil_image(image)) for image in batch])
            yield (batch.pin_memory() if pin else batch), decoded.labels[index]

    return epoch


def _streamed(dataset: Dataset, transform: Augment, order: torch.Generator, train: TrainConfig, pin: bool):
    loader = DataLoader(
        Transformed(dataset, transform),
        batch_sampler=BatchSampler(EpochOrder(len(dataset), order), train.batch_size, drop_last=False),
        num_workers=train.workers,
        persistent_workers=train.workers > 0,
        prefetch_factor=train.prefetch if train.workers > 0 else None,
        pin_memory=pin,
        generator=torch.Generator().manual_seed(train.seed),  # seeds each worker's torch, random and numpy
    )
    return lambda: iter(loader)
