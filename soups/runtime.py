"""Where computation runs: the device and how many CPU threads one job may use."""

from __future__ import annotations

import os

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA on a machine without it is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available here; use device: auto or cpu")
    return device


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def use_cores(threads: int | None = None) -> int:
    """Give torch ``threads`` intra-op threads (all cores by default) so parallel jobs can split the machine
    instead of each taking every core and oversubscribing it."""
    count = max(1, threads or available_cores())
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


def trial_slots(device: str, parallel: int, gpus: int | None = None) -> list[str]:
    """The device of each of the ``parallel`` trials a process runs at once. With ``device`` 'auto' or 'cuda'
    and GPUs, each slot gets its own GPU and there are at most as many slots as GPUs (two trials never
    share one); otherwise every slot uses ``device`` (CPU-only machines keep the configured parallelism)."""
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if device in ("auto", "cuda") and gpus >= 1:
        return [f"cuda:{index}" for index in range(min(parallel, gpus))]
    return [device] * parallel
