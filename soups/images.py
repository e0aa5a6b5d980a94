"""Images as the models see them: a split decoded once into uint8 tensors when it fits in memory, or read from
disk batch by batch by DataLoader workers when it does not (ImageNet's train split is 193 GB decoded).

Both give the same batches of uint8 [B,3,S,S] images at the model's resolution (resize the short side,
centre-crop); normalisation happens per batch on the device (`Preprocess.normalize`), so what crosses to a
GPU is 4x smaller than float.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2


@dataclass(frozen=True)
class Preprocess:
    """The model's eval preprocessing, split into a decode-once part and a per-batch normalisation."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"

    @classmethod
    def of(cls, module: nn.Module) -> Preprocess:
        """Read open_clip's preprocessing config from a CLIP model or our classifier (both have ``.visual``)."""
        import open_clip

        cfg = open_clip.get_model_preprocess_cfg(module)
        size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
        return cls(size, tuple(cfg["mean"]), tuple(cfg["std"]), cfg.get("interpolation", "bicubic"))

    def resize(self) -> v2.Compose:
        """Resize the short side and centre-crop to the model's square input (PIL images or uint8 tensors)."""
        mode = v2.InterpolationMode(self.interpolation)
        return v2.Compose([v2.Resize(self.size, interpolation=mode, antialias=True), v2.CenterCrop(self.size)])

    def decode_transform(self) -> v2.Compose:
        return v2.Compose([v2.PILToTensor(), self.resize()])

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,H,W] on any device -> normalised float32."""
        mean, std = self._stats(images.device)
        return (images.float() / 255.0 - mean) / std

    @lru_cache(maxsize=8)  # noqa: B019 - frozen and hashable; one small pair of tensors per device
    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std on ``device``, made once instead of a host-to-device copy per batch."""
        shape = (1, -1, 1, 1)
        return (torch.tensor(self.mean, device=device).view(shape), torch.tensor(self.std, device=device).view(shape))

    def image_bytes(self) -> int:
        """Bytes of one decoded uint8 image."""
        return 3 * self.size * self.size


class ImageSplit(Protocol):
    """A labelled split read as uint8 batches in a fixed order: `ImageTensors` or `StreamedImages`."""

    labels: torch.Tensor

    def __len__(self) -> int: ...

    def subset(self, rows: torch.Tensor) -> ImageSplit: ...

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


@dataclass(frozen=True)
class ImageTensors:
    """A split decoded once: uint8 images [N,3,H,W] and int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, rows: torch.Tensor) -> ImageTensors:
        return ImageTensors(self.images[rows], self.labels[rows])

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self), batch_size):
            yield self.images[start : start + batch_size], self.labels[start : start + batch_size]

    def pinned(self) -> ImageTensors:
        """Page-locked images, so host-to-GPU copies overlap compute."""
        return ImageTensors(self.images.pin_memory(), self.labels)


def labels_of(dataset: Dataset) -> torch.Tensor:
    """A dataset's labels without decoding an image (every dataset of soups.data keeps them as ``labels``)."""
    if isinstance(dataset, Subset):
        return labels_of(dataset.dataset)[torch.as_tensor(dataset.indices)]
    return torch.as_tensor([int(label) for label in dataset.labels], dtype=torch.int64)


class Transformed(Dataset):
    """(PIL image, label) items mapped through ``transform`` to (uint8 tensor, label): what a worker runs."""

    def __init__(self, dataset: Dataset, transform) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[index]
        return self.transform(image.convert("RGB")), int(label)


def decode(dataset: Dataset, preprocess: Preprocess) -> ImageTensors:
    """Decode and resize every image of a (PIL image, label) dataset once."""
    if len(dataset) == 0:
        raise ValueError("cannot evaluate on an empty split")
    items = Transformed(dataset, preprocess.decode_transform())
    images, labels = zip(*(items[i] for i in range(len(items))), strict=True)
    return ImageTensors(torch.stack(images), torch.tensor(labels, dtype=torch.int64))


class StreamedImages:
    """A split decoded batch by batch by ``workers`` DataLoader processes, in a fixed order: memory stays at
    about workers x prefetch x batch images whatever the split's size. One loader per batch size is kept
    (persistent workers), so the many passes of a greedy soup do not restart processes."""

    def __init__(self, dataset: Dataset, preprocess: Preprocess, workers: int = 2, prefetch: int = 2) -> None:
        if len(dataset) == 0:
            raise ValueError("cannot evaluate on an empty split")
        self.dataset, self.preprocess, self.workers, self.prefetch = dataset, preprocess, workers, prefetch
        self.labels = labels_of(dataset)
        self._loaders: dict[int, DataLoader] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def subset(self, rows: torch.Tensor) -> StreamedImages:
        return StreamedImages(Subset(self.dataset, rows.tolist()), self.preprocess, self.workers, self.prefetch)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if batch_size not in self._loaders:
            self._loaders[batch_size] = DataLoader(
                Transformed(self.dataset, self.preprocess.decode_transform()),
                batch_size=batch_size,
                shuffle=False,
                num_workers=self.workers,
                persistent_workers=self.workers > 0,
                prefetch_factor=self.prefetch if self.workers > 0 else None,
                pin_memory=torch.cuda.is_available(),
            )
        yield from self._loaders[batch_size]


Decoder = Callable[[Dataset, Preprocess], ImageTensors]
"""How a split fitting in memory is decoded: `decode`, or `soups.decoded`'s machine-wide cache of it."""


def cached_or_streamed(
    datasets: Sequence[tuple[str, Dataset]],
    preprocess: Preprocess,
    cache_bytes: int,
    workers: int,
    decoder: Decoder = decode,
) -> dict[str, ImageSplit]:
    """Decode splits into memory in the given order (most-used first) while they fit ``cache_bytes`` in all;
    stream the rest."""
    splits: dict[str, ImageSplit] = {}
    left = cache_bytes
    for name, dataset in datasets:
        size = len(dataset) * preprocess.image_bytes()
        if size <= left:
            splits[name], left = decoder(dataset, preprocess), left - size
        else:
            splits[name] = StreamedImages(dataset, preprocess, workers)
    return splits
