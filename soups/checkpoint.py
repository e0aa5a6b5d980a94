"""Safetensors checkpoints: reading headers cheaply, checking ingredients against each other, writing atomically.

Ingredients are validated from their headers alone before any tensor is read, so a bad pool fails in
milliseconds and names the offending files instead of failing half-way through a soup.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

StateDict = dict[str, torch.Tensor]

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_MISMATCHES_SHOWN = 5


class CheckpointError(ValueError):
    """A checkpoint cannot be used: missing, unreadable, truncated, or not a safetensors file."""


class IncompatibleCheckpointsError(CheckpointError):
    """Ingredients do not share keys, shapes and dtypes, so they cannot be averaged."""


class NonFiniteTensorError(CheckpointError):
    """An ingredient holds NaN or infinite values; averaging would poison the soup."""


@dataclass(frozen=True)
class Ingredient:
    """One fine-tuned checkpoint and what is known about it (held-out score, where it came from)."""

    path: Path
    score: float | None = None
    name: str = ""
    origin: Mapping[str, str] = field(default_factory=dict)
    loss: float | None = None
    """Held-out loss, the first tie-break after ``score`` (`soups.selection`)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if not self.name:
            object.__setattr__(self, "name", self.path.stem)


@dataclass(frozen=True)
class TensorSpec:
    dtype: str
    shape: tuple[int, ...]


def read_header(path: Path) -> dict[str, TensorSpec]:
    """Parse a safetensors header without reading tensor data, checking the file is long enough."""
    return read_layout(path)[0]


def read_layout(path: Path) -> tuple[dict[str, TensorSpec], dict[str, tuple[int, int]], int]:
    """The header's specs, each tensor's byte range [begin, end) and the offset its data starts at (what a
    reader needs to fetch a tensor with one positioned read), all checked against the file's length."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (check the path, or that the run finished writing it)")
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: file is {size} bytes, too short to be a safetensors checkpoint")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(_MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(
                    f"{path}: header length {header_len} exceeds the file; truncated or not safetensors"
                )
            raw = json.loads(f.read(header_len))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"{path}: unreadable safetensors header ({err}); re-export the checkpoint") from err
    if not isinstance(raw, dict):
        raise CheckpointError(
            f"{path}: unreadable safetensors header (a JSON {type(raw).__name__}, not an object of tensors); "
            "re-export the checkpoint"
        )
    raw.pop("__metadata__", None)
    specs: dict[str, TensorSpec] = {}
    spans: dict[str, tuple[int, int]] = {}
    for key, entry in raw.items():
        specs[key], spans[key] = _tensor_entry(path, key, entry)
    data_end = 0
    for begin, end in sorted(spans.values()):  # tensors tile the data section, as safetensors requires
        if begin != data_end:
            raise CheckpointError(f"{path}: tensor data overlaps or leaves a gap at byte {begin}; damaged header")
        data_end = end
    if 8 + header_len + data_end > size:
        raise CheckpointError(
            f"{path}: truncated: header promises {8 + header_len + data_end} bytes, file has {size}; "
            "the copy or download was interrupted, fetch it again"
        )
    if 8 + header_len + data_end < size:
        raise CheckpointError(
            f"{path}: {size - 8 - header_len - data_end} bytes follow its last tensor; damaged or not safetensors"
        )
    return specs, spans, 8 + header_len


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_entry(path: Path, key: str, entry: object) -> tuple[TensorSpec, tuple[int, int]]:
    """One header entry's spec and its bytes' range, checked field by field so a damaged header is a
    CheckpointError naming the tensor, never a KeyError or TypeError from deep inside the reader."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path}: tensor {key!r} has no dtype, shape and data_offsets; damaged header")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {dtype!r:.40}")
    if not isinstance(shape, list) or not all(_is_count(dim) for dim in shape):
        raise CheckpointError(f"{path}: tensor {key!r} has shape {shape!r:.60}, not a list of sizes; damaged header")
    pair = isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
    if not pair or offsets[0] > offsets[1]:
        raise CheckpointError(f"{path}: tensor {key!r} has data_offsets {offsets!r:.60}, not [begin, end]; damaged")
    needed = math.prod(shape) * torch.empty((), dtype=SAFETENSORS_DTYPES[dtype]).element_size()
    if offsets[1] - offsets[0] != needed:
        raise CheckpointError(
            f"{path}: tensor {key!r} spans {offsets[1] - offsets[0]} bytes, its {dtype} shape {shape} needs {needed}; "
            "damaged header"
        )
    return TensorSpec(dtype, tuple(shape)), (offsets[0], offsets[1])


def check_compatible(paths: Sequence[Path]) -> dict[str, TensorSpec]:
    """Check that every checkpoint has the same keys, shapes and dtypes as the first; return that layout."""
    if not paths:
        raise CheckpointError("no ingredients given: a soup needs at least one checkpoint")
    reference_path = Path(paths[0])
    reference = read_header(reference_path)
    for path in paths[1:]:
        problems = layout_differences(reference, read_header(Path(path)))
        if problems:
            shown = "; ".join(problems[:_MISMATCHES_SHOWN])
            more = f" (and {len(problems) - _MISMATCHES_SHOWN} more)" if len(problems) > _MISMATCHES_SHOWN else ""
            raise IncompatibleCheckpointsError(
                f"{path} is incompatible with {reference_path}: {shown}{more}. "
                "Only checkpoints fine-tuned from the same architecture can be souped."
            )
    return reference


def layout_differences(reference: dict[str, TensorSpec], other: dict[str, TensorSpec]) -> list[str]:
    problems = [f"missing key {k!r}" for k in reference if k not in other]
    problems += [f"unexpected key {k!r}" for k in other if k not in reference]
    for key, spec in reference.items():
        theirs = other.get(key)
        if theirs is None:
            continue
        if theirs.shape != spec.shape:
            problems.append(f"{key!r} has shape {list(theirs.shape)}, expected {list(spec.shape)}")
        if theirs.dtype != spec.dtype:
            problems.append(f"{key!r} has dtype {theirs.dtype}, expected {spec.dtype}")
    return problems


def iter_tensors(path: Path, keys: Sequence[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield tensors one at a time, so callers hold one tensor of this file at once, never the whole file."""
    from soups.tensorfile import TensorFile

    with TensorFile(path) as file:
        for key in keys if keys is not None else file.specs:
            yield key, file.read(key)


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (what the registry's ``sha256`` tags hold), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_digest(path: Path) -> str:
    """sha256 of the tensors alone (names, dtypes, shapes, bytes, in key order). Equal weights give equal
    digests whatever the file's metadata, whose order safetensors does not keep stable across processes."""
    return tensors_digest(iter_tensors(Path(path), sorted(read_header(Path(path)))))


def tensors_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """`weights_digest` of (key, tensor) pairs given in key order: the digest of a file before it is written,
    so a writer need not read it back."""
    digest = hashlib.sha256()
    for key, tensor in tensors:
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def load_state_dict(path: Path) -> StateDict:
    """Load a whole checkpoint (validated header first, so errors name the file)."""
    read_header(Path(path))
    return dict(iter_tensors(Path(path)))


@torch.no_grad()
def load_checkpoint_into(module: torch.nn.Module, path: Path) -> torch.nn.Module:
    """Copy a checkpoint file into ``module`` tensor by tensor, strictly (same keys and shapes, cast to the
    module's dtypes as ``load_state_dict`` does): no state dict of the file is ever held, one tensor at a time."""
    targets = module.state_dict()
    layout = read_header(Path(path))
    missing, unexpected = [k for k in targets if k not in layout], [k for k in layout if k not in targets]
    wrong = [k for k, spec in layout.items() if k in targets and tuple(targets[k].shape) != spec.shape]
    if missing or unexpected or wrong:
        raise RuntimeError(
            f"{path} does not fit the module: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}, "
            f"shape mismatches {wrong[:5]}"
        )
    for key, tensor in iter_tensors(Path(path)):
        targets[key].copy_(tensor)
    return module


def ensure_finite(key: str, tensor: torch.Tensor, source: str) -> None:
    """Refuse NaN/inf values. A float32 sum is finite exactly when every entry is (barring overflow of huge
    values, which the exact check below then clears), and costs a tenth of an elementwise isfinite."""
    if not tensor.is_floating_point() or bool(torch.isfinite(torch.sum(tensor, dtype=torch.float32))):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise NonFiniteTensorError(
            f"{source}: tensor {key!r} has {bad} NaN/inf values; this ingredient diverged, leave it out of the soup"
        )


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write to a temporary name in the same folder, then rename: readers never see a half-written file. Equal
    tensors and metadata give equal bytes (keys and metadata in order), so a file's sha256 says whether two
    runs made the same checkpoint. Each tensor's bytes are written from its own memory: safetensors' writer
    first copies every tensor into one bytes object, a second model in memory while a soup is written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if any(not isinstance(value, str) for value in (metadata or {}).values()):
        raise TypeError(f"safetensors metadata values are strings: {dict(metadata or {})!r:.200}")
    tensors = {k: state_dict[k].detach().contiguous().cpu() for k in sorted(state_dict)}
    header: dict[str, object] = {"__metadata__": dict(sorted((metadata or {}).items()))} if metadata else {}
    offset = 0
    for key, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[key] = {
            "dtype": _DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors pads its header to 8 bytes with spaces
    try:
        with tmp.open("wb") as f:
            f.write(struct.pack("<Q", len(encoded)) + encoded)
            for tensor in tensors.values():
                f.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def torch_dtype(name: str) -> torch.dtype:
    """Map a dtype given on the command line or in a config ('float16', 'bf16', 'F32') to torch."""
    aliases = {
        "float32": "F32",
        "fp32": "F32",
        "float16": "F16",
        "fp16": "F16",
        "half": "F16",
        "bfloat16": "BF16",
        "bf16": "BF16",
        "float64": "F64",
        "fp64": "F64",
    }
    key = aliases.get(name.lower(), name.upper())
    if key not in SAFETENSORS_DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of float32, float16, bfloat16, float64")
    return SAFETENSORS_DTYPES[key]
