"""Decoded splits kept on this machine, so every trial process of a machine decodes a split once, not each time.

A deployed trial (``sweep.dispatch: deployment``) is a fresh process that would decode its train and held-out
splits again. `cached_decode` keeps a split's decoded uint8 images in one file per (dataset fingerprint,
decode settings, library versions) under the machine's cache folder (``tracking.cache_dir``/decoded): a
header naming what it holds and the sha256 of its payload, then the int64 labels, then the images, which
are memory-mapped (copy-on-write), so the page cache is shared by the trials of a machine. A file is
written to a temporary name and renamed into place (concurrent writers each leave a whole file, the last
rename wins), and checked on every use (size, header, key, payload digest): a truncated or damaged one is
decoded again and replaced, never trusted. Delete the folder to clear it.

The key is the dataset's own fingerprint (`ArrayDataset.fingerprint`, `FileDataset.fingerprint`: its pixels,
or its files' paths, sizes and mtimes, and its labels), never a serialised config; a dataset without one is
decoded every time.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import warnings
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
from torch.utils.data import Dataset, Subset

from soups.images import ImageTensors, Preprocess, decode

MAGIC = b"SOUPSDEC"
FORMAT = 1
_PREFIX = struct.Struct("<8sQ")  # magic, header length
_ALIGN = 64


def dataset_fingerprint(dataset: Dataset) -> str | None:
    """The dataset's own fingerprint (subsets: their source's and their rows), or None when it has none."""
    if isinstance(dataset, Subset):
        source = dataset_fingerprint(dataset.dataset)
        if source is None:
            return None
        rows = np.asarray(dataset.indices, dtype=np.int64)
        return hashlib.sha256(source.encode() + rows.tobytes()).hexdigest()
    fingerprint = getattr(dataset, "fingerprint", None)
    return fingerprint() if callable(fingerprint) else None


def cache_key(fingerprint: str, preprocess: Preprocess) -> str:
    """What decoded pixels depend on: the images, the resize, and the libraries that resize them."""
    parts = [str(FORMAT), fingerprint, str(preprocess.size), preprocess.interpolation]
    parts += [torch.__version__, torchvision.__version__, PIL.__version__]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def cached_decode(dataset: Dataset, preprocess: Preprocess, cache_dir: Path | None) -> ImageTensors:
    """The split decoded (`soups.images.decode`), read from ``cache_dir`` when a valid copy is there, written there
    when not. Without a cache folder or a dataset fingerprint it decodes."""
    fingerprint = dataset_fingerprint(dataset) if cache_dir is not None else None
    if cache_dir is None or fingerprint is None:
        return decode(dataset, preprocess)
    key = cache_key(fingerprint, preprocess)
    path = cache_dir / f"{key}.decoded"
    if path.exists():
        try:
            return read_decoded(path, key)
        except DecodedCacheError as err:
            print(f"decoded cache {path} is not usable ({err}): decoding again")
    decoded = decode(dataset, preprocess)
    write_decoded(path, key, decoded)
    return decoded


class DecodedCacheError(ValueError):
    """A cache file that is not a whole, matching copy of what its name says: rebuilt, never used."""


def _payload(decoded: ImageTensors) -> tuple[np.ndarray, np.ndarray]:
    labels = np.ascontiguousarray(decoded.labels.numpy(), dtype="<i8")
    return labels, np.ascontiguousarray(decoded.images.numpy(), dtype=np.uint8)


def write_decoded(path: Path, key: str, decoded: ImageTensors) -> None:
    """Write atomically (temporary file, then rename); an unwritable cache only costs the next process a decode."""
    labels, images = _payload(decoded)
    digest = hashlib.sha256(labels.tobytes())
    digest.update(memoryview(images).cast("B"))
    header = json.dumps(
        {"format": FORMAT, "key": key, "shape": list(images.shape), "sha256": digest.hexdigest()}
    ).encode()
    header += b" " * (-(_PREFIX.size + len(header)) % _ALIGN)
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("wb", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
            temporary = Path(handle.name)
            handle.write(_PREFIX.pack(MAGIC, len(header)) + header)
            handle.write(labels.tobytes())
            handle.write(memoryview(images).cast("B"))
        os.replace(temporary, path)
    except OSError as err:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        warnings.warn(f"cannot keep decoded images in {path.parent} ({err}); set tracking.cache_dir", stacklevel=2)


def read_decoded(path: Path, key: str) -> ImageTensors:
    """The file's images memory-mapped (copy-on-write) and its labels, after checking size, header and digest;
    `DecodedCacheError` otherwise."""
    try:
        with path.open("rb") as handle:
            magic, length = _PREFIX.unpack(handle.read(_PREFIX.size))
            if magic != MAGIC or length > 1 << 20:
                raise DecodedCacheError("not a decoded-images file")
            header = json.loads(handle.read(length))
        shape = tuple(int(n) for n in header["shape"])
        if header["format"] != FORMAT or header["key"] != key or len(shape) != 4:
            raise DecodedCacheError("its header is for something else")
        offset = _PREFIX.size + length
        count = shape[0]
        expected = offset + 8 * count + int(np.prod(shape))
        if path.stat().st_size != expected:
            raise DecodedCacheError(f"{path.stat().st_size} bytes, {expected} expected: truncated or padded")
        labels = np.fromfile(path, dtype="<i8", count=count, offset=offset)
        images = np.memmap(path, dtype=np.uint8, mode="c", offset=offset + 8 * count, shape=shape)
    except DecodedCacheError:
        raise
    except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
        raise DecodedCacheError(f"unreadable: {err}") from err
    digest = hashlib.sha256(labels.tobytes())
    digest.update(memoryview(images).cast("B"))
    if digest.hexdigest() != header["sha256"]:
        raise DecodedCacheError("its content does not match its sha256")
    return ImageTensors(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))
