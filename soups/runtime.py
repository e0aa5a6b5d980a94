"""Where computation runs: the device and how many CPU threads one job may use."""

from __future__ import annotations

import os
import platform
from importlib import metadata

import torch

CUBLAS_WORKSPACE = ":4096:8"
"""The cuBLAS workspace setting PyTorch's deterministic mode asks for (one of the two it accepts)."""
_DETERMINISTIC_WORKSPACES = (":4096:8", ":16:8")
_VERSIONED = ("torch", "torchvision", "open_clip_torch", "timm", "numpy", "pillow", "safetensors")


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


def use_determinism(deterministic: bool) -> None:
    """Switch PyTorch's deterministic algorithms on or off for this process (its trials share one config).

    On CUDA that also means cuDNN's deterministic kernels, no cuDNN autotuning and a fixed cuBLAS workspace
    (``CUBLAS_WORKSPACE_CONFIG``, read once, when cuBLAS first runs: call this before any CUDA work)."""
    if deterministic:
        workspace = os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        if workspace not in _DETERMINISTIC_WORKSPACES:
            raise ValueError(
                f"train.deterministic needs CUBLAS_WORKSPACE_CONFIG {' or '.join(_DETERMINISTIC_WORKSPACES)}, "
                f"but it is {workspace!r} in this environment; unset it or set one of those"
            )
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = False


def determinism_record(device: torch.device, augmentation_workers: int) -> dict[str, str]:
    """What besides the config decides a run's numbers: library versions, threads, the deterministic mode and
    the hardware (MLflow params ``runtime.*`` of every trial)."""
    record = {name: metadata.version(name) for name in _VERSIONED}
    record |= {
        "python": platform.python_version(),
        "torch_threads": str(torch.get_num_threads()),
        "deterministic": str(torch.are_deterministic_algorithms_enabled()),
        "device": str(device),
        "augmentation_workers": str(augmentation_workers),
        "machine": platform.machine(),
    }
    if device.type == "cuda":
        record |= {
            "cuda": str(torch.version.cuda),
            "cudnn": str(torch.backends.cudnn.version()),
            "gpu": torch.cuda.get_device_name(device),
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG", ""),
        }
    return record
