"""Checkpoints fine-tuned elsewhere, converted into this project's ingredient layout (``visual.*`` + ``head.*``).

Two layouts are understood:

- ``open_clip``: what this project writes (a `ClipClassifier` state dict), as safetensors or a PyTorch file.
- ``model-soups``: the paper's 72 released ViT-B/32 fine-tunes, state dicts of its ``ModelWrapper``: an OpenAI
  CLIP under ``model.`` whose text ``transformer`` was deleted (its other text parameters remain), and a
  ``classification_head``. The wrapper computes ``classification_head(normalize(model.encode_image(x)))``
  and its head starts as ``100 * zero-shot text embeddings``: the logit scale is folded into the weight and
  the head reads L2-normalised features, exactly like `ClipClassifier`'s ``head``. So ``model.visual.X``
  maps to ``visual.X`` (OpenAI's and open_clip's ViT use the same parameter names), ``classification_head.*``
  to ``head.*`` unchanged, and the text keys are dropped.

PyTorch files are read with ``weights_only=True`` only: a file whose unpickling needs anything but tensors and
plain containers is refused, never executed. A state dict nested under ``state_dict``, ``model_state_dict`` or
``model`` (a training checkpoint) and a ``module.`` prefix (``DataParallel``) are unwrapped.

Every converted checkpoint is loaded strictly into the named architecture and checked for NaN/inf before it is
written, so an import fails on the file that is wrong, not later in the kitchen.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import open_clip
import torch

from soups.checkpoint import (
    CheckpointError,
    StateDict,
    ensure_finite,
    file_sha256,
    load_state_dict,
    save_state_dict,
    tensors_digest,
)
from soups.models import CheckpointMismatchError, ClipClassifier, classifier_from_state_dict, model_config

Format = Literal["open_clip", "model-soups"]
FORMATS: tuple[str, ...] = ("auto", "open_clip", "model-soups")

_NESTING_KEYS = ("state_dict", "model_state_dict", "model")
_PARALLEL_PREFIX = "module."
_PAPER_VISUAL, _PAPER_HEAD, _PAPER_MODEL = "model.visual.", "classification_head.", "model."
_CLIP_TEXT_KEYS = frozenset(
    {
        "token_embedding.weight",
        "positional_embedding",
        "ln_final.weight",
        "ln_final.bias",
        "text_projection",
        "logit_scale",
    }
)
_CLIP_TEXT_PREFIX = "transformer."
_KEYS_SHOWN = 5
_DETAIL_CHARS = 200


class CheckpointImportError(CheckpointError):
    """A checkpoint cannot be imported; the message names the file and what to do."""


class UnsafeCheckpointError(CheckpointImportError):
    """A PyTorch file that only loads by unpickling arbitrary objects, which could run code: refused unread."""


@dataclass(frozen=True)
class ConvertedCheckpoint:
    """An imported checkpoint in the ingredient layout, ready to register."""

    path: Path
    sha256: str
    weights_sha256: str
    num_classes: int
    source: Path
    format: Format
    notes: tuple[str, ...] = ()


def read_checkpoint(path: Path, mapped: bool = False) -> StateDict:
    """Tensors of a safetensors file, or of a PyTorch file loaded without running any pickled code. ``mapped``:
    a PyTorch zip file is mapped, not read, so tensors cost memory only when used and the unused ones (the text
    tower's leftovers) never do; the file must then not be rewritten while the tensors live."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointImportError(f"{path}: no such file; check the path")
    if _is_safetensors(path):
        return load_state_dict(path)
    loaded = _torch_load(path, mapped and zipfile.is_zipfile(path))
    return _strip_parallel_prefix(_unwrap(loaded, path))


def detect_format(keys: Iterable[str], source: str = "checkpoint") -> Format:
    """Which layout the keys are in; an error lists the first keys when neither fits."""
    keys = list(keys)
    if any(k.startswith((_PAPER_VISUAL, _PAPER_HEAD)) for k in keys):
        return "model-soups"
    if "head.weight" in keys and any(k.startswith("visual.") for k in keys):
        return "open_clip"
    raise CheckpointImportError(
        f"{source}: cannot tell its layout from its keys ({_first(keys)}); expected visual.* + head.* (open_clip) "
        "or model.visual.* + classification_head.* (model-soups): pass --format if it is one of them"
    )


def to_classifier_state_dict(state_dict: Mapping[str, torch.Tensor], fmt: Format) -> StateDict:
    """Rename keys into the ingredient layout. Unknown keys are kept, so the architecture check names them."""
    if fmt == "open_clip":
        return dict(state_dict)
    converted: StateDict = {}
    for key, tensor in state_dict.items():
        if key.startswith(_PAPER_VISUAL):
            converted["visual." + key[len(_PAPER_VISUAL) :]] = tensor
        elif key.startswith(_PAPER_HEAD):
            converted["head." + key[len(_PAPER_HEAD) :]] = tensor
        elif not _is_clip_text_key(key):
            converted[key] = tensor
    return converted


def convert(path: Path, model_name: str, fmt: str, out_dir: Path) -> ConvertedCheckpoint:
    """Read, rename, check against ``model_name`` (keys, shapes, finiteness) and write ``<stem>.safetensors``.

    The written tensors are those of the architecture's classifier after a strict load (its key order and
    dtypes), so imported ingredients average with each other and with the project's own.
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise CheckpointImportError(f"{path}: unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    config = model_config(model_name)
    raw = read_checkpoint(path, mapped=True)
    layout = detect_format(raw, str(path)) if fmt == "auto" else cast(Format, fmt)
    renamed = to_classifier_state_dict(raw, layout)
    try:
        classifier = _architecture_shell(renamed, model_name, str(path))
    except CheckpointMismatchError as err:
        raise CheckpointImportError(
            f"{err} (read as {layout}); pass --model with the architecture it was fine-tuned from"
            + (", or --format if that layout is wrong" if fmt == "auto" else ", or another --format")
        ) from err
    # The classifier's keys in its order and dtypes, as a strict load would leave them.
    state_dict = {key: renamed[key].to(shell.dtype) for key, shell in classifier.state_dict().items()}
    del raw, renamed
    for key, tensor in state_dict.items():
        ensure_finite(key, tensor, str(path))
    metadata = {
        "model_name": model_name,
        "num_classes": str(classifier.num_classes),
        "source_file": str(path.resolve()),
        "format": layout,
    }
    out = save_state_dict(state_dict, Path(out_dir) / f"{path.stem}.safetensors", metadata)
    return ConvertedCheckpoint(
        path=out,
        sha256=file_sha256(out),
        weights_sha256=tensors_digest(sorted(state_dict.items())),  # as weights_digest(out), without reading it
        num_classes=classifier.num_classes,
        source=path,
        format=layout,
        notes=_activation_notes(config, model_name, layout),
    )


def _architecture_shell(state_dict: Mapping[str, torch.Tensor], model_name: str, source: str) -> ClipClassifier:
    """The architecture built on the meta device (no weights made or initialised: milliseconds, not seconds, for
    ViT-B/32) and strictly checked against ``state_dict``'s keys and shapes (`classifier_from_state_dict`)."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*meta parameter.*")  # the check is the point, not the copy
        return classifier_from_state_dict(state_dict, model_name, device="meta", source=source)


def _is_safetensors(path: Path) -> bool:
    """A safetensors file is an 8-byte header length followed by a JSON object; PyTorch files are zip or pickle."""
    with path.open("rb") as f:
        return f.read(9)[8:] == b"{"


def _torch_load(path: Path, mapped: bool) -> Any:
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it then refuses anyway
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = f"the object {found.group(1)}" if found else "objects other than tensors"
        raise UnsafeCheckpointError(
            f"{path}: refused: loading it needs {what}, and unpickling arbitrary objects can run code; if you trust "
            "its source, re-save only its state dict (tensors) with torch.save or safetensors and import that"
        ) from None
    except Exception as err:  # torch raises KeyError, RuntimeError, EOFError, ... for files that are not checkpoints
        detail = " ".join(f"{type(err).__name__}: {err}".split())[:_DETAIL_CHARS]
        raise CheckpointImportError(
            f"{path}: not a readable PyTorch or safetensors checkpoint ({detail}); check the file (a partial download?)"
        ) from None


def _unwrap(loaded: Any, path: Path) -> StateDict:
    """The state dict itself, or the one a training checkpoint nests under a usual key."""
    if _is_tensor_dict(loaded):
        return dict(loaded)
    if isinstance(loaded, Mapping):
        for key in _NESTING_KEYS:
            if _is_tensor_dict(loaded.get(key)):
                return dict(loaded[key])
        shown = _first([str(k) for k in loaded])
    else:
        shown = type(loaded).__name__
    raise CheckpointImportError(
        f"{path}: holds no state dict of tensors (found: {shown}); save the model's state_dict() itself, "
        f"or nest it under one of {', '.join(_NESTING_KEYS)}"
    )


def _is_tensor_dict(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and bool(value)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


def _strip_parallel_prefix(state_dict: StateDict) -> StateDict:
    """Keys saved from a ``DataParallel`` wrapper all start with ``module.``."""
    if all(k.startswith(_PARALLEL_PREFIX) for k in state_dict):
        return {k[len(_PARALLEL_PREFIX) :]: v for k, v in state_dict.items()}
    return state_dict


def _is_clip_text_key(key: str) -> bool:
    """A parameter of the paper's leftover CLIP text tower (or of the text transformer, had it been kept)."""
    if not key.startswith(_PAPER_MODEL):
        return False
    name = key[len(_PAPER_MODEL) :]
    return name in _CLIP_TEXT_KEYS or name.startswith(_CLIP_TEXT_PREFIX)


def _activation_notes(config: Mapping[str, Any], model_name: str, layout: Format) -> tuple[str, ...]:
    """OpenAI CLIP was trained with QuickGELU; open_clip's plain names use GELU, which shifts every activation."""
    if layout != "model-soups" or config.get("quick_gelu"):
        return ()
    quick = f"{model_name}-quickgelu"
    fix = f"import with --model {quick}" if open_clip.get_model_config(quick) else "use a QuickGELU architecture"
    return (
        f"{model_name!r} uses GELU, but the paper's checkpoints are OpenAI CLIP models trained with QuickGELU: they "
        f"load, but their outputs shift; to reproduce them exactly, {fix} (and cook with the same model.name)",
    )


def _first(keys: list[str]) -> str:
    shown = ", ".join(keys[:_KEYS_SHOWN])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > _KEYS_SHOWN else shown or "no keys"
