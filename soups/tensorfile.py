"""Safetensors tensors read with positioned reads into buffers the caller may reuse, and reads done one step
ahead in a thread.

No memory map: a mapped file's pages count in the process's resident memory for as long as it is open, so
a merge of N mapped checkpoints looked N models big; read with ``os.preadv`` they stay the page cache's. A
reused buffer also spares the page faults of a fresh allocation per tensor. Reads release the GIL, so the
next tensor is read while torch computes on the current one.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import TypeVar

import torch

from soups.checkpoint import SAFETENSORS_DTYPES, CheckpointError, TensorSpec, read_layout

T = TypeVar("T")


class TensorFile:
    """One checkpoint opened for reading; its header is parsed and checked against the file's length once."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.specs, self._spans, self._data_start = read_layout(self.path)
        self._fd = os.open(self.path, os.O_RDONLY)

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def spec(self, key: str) -> TensorSpec:
        try:
            return self.specs[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {key!r}") from None

    def read(self, key: str) -> torch.Tensor:
        """A new tensor with ``key``'s stored dtype and shape."""
        spec = self.spec(key)
        out = torch.empty(spec.shape, dtype=SAFETENSORS_DTYPES[spec.dtype])
        self._read_bytes(key, out)
        return out

    def read_into(self, key: str, out: torch.Tensor) -> torch.Tensor:
        """Fill ``out`` (contiguous, ``key``'s shape) with ``key``'s values, converted to ``out``'s dtype."""
        spec = self.spec(key)
        if tuple(out.shape) != spec.shape or not out.is_contiguous():
            raise ValueError(f"{key!r}: cannot read a {spec.shape} tensor into a {tuple(out.shape)} buffer")
        if out.dtype == SAFETENSORS_DTYPES[spec.dtype]:
            self._read_bytes(key, out)
        else:
            out.copy_(self.read(key))
        return out

    def _read_bytes(self, key: str, out: torch.Tensor) -> None:
        begin, end = self._spans[key]
        if end == begin:
            return
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        done, offset = 0, self._data_start + begin
        while done < end - begin:  # preadv may return fewer bytes than asked (signals, >2 GiB reads)
            count = os.preadv(self._fd, [view[done:]], offset + done)
            if count == 0:
                raise CheckpointError(
                    f"{self.path}: tensor {key!r} ends past the end of the file; it was truncated, fetch it again"
                )
            done += count


READERS = 2
"""Jobs run at once ahead of the caller: reading and checking N tensors takes longer than most merges of
them, so two threads read while the caller merges; ``READERS + 1`` buffers are used in turn."""


def read_ahead(jobs: Iterable[Callable[[], T]], ahead: int = READERS) -> Iterator[T]:
    """Run ``jobs`` in order on ``ahead`` worker threads, at most ``ahead`` jobs past the result the caller
    works on: job i + ahead + 1 starts only once the caller asked for result i + 1, so ``ahead + 1`` buffers
    used in turn (job i writes buffer i % (ahead + 1)) are never written while the caller reads them. A job's
    exception is raised where its result would have been yielded."""
    iterator = iter(jobs)
    with ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="soups-read") as pool:
        pending = deque(pool.submit(job) for job in islice(iterator, ahead))
        while pending:
            result = pending.popleft().result()
            following = next(iterator, None)
            if following is not None:
                pending.append(pool.submit(following))
            yield result
