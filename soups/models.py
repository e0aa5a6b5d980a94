"""open_clip models as soup ingredients: an image encoder plus a zero-shot-initialised linear head.

A soup averages state dicts, so every ingredient must have the same keys and shapes. `ClipClassifier` keeps
only the image tower (``visual.*``, exactly the keys of a full CLIP checkpoint) and ``head.*``; the text
tower is used once to build the zero-shot head and then dropped, so checkpoints stay small and the
``visual.*`` part of any ingredient loads back into an open_clip model.

Project architectures live as JSON files in ``soups/model_configs/`` (open_clip's schema) and are
registered with open_clip on first use. ``soups-vit-tiny`` (the default) and ``soups-vit-small`` take
32x32 images and fine-tune in seconds on a 2-core CPU; open_clip's own architectures work unchanged.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from soups.checkpoint import CheckpointError, load_state_dict, save_state_dict
from soups.pretrained import PretrainedStart, local_dir, parse_pretrained

Transform = Callable[[Any], torch.Tensor]
"""An image transform: PIL image in, normalised [3, H, W] tensor out."""

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
_HUB_PROBE_TIMEOUT_S = 2.0
_KEYS_SHOWN = 5
_DETAIL_CHARS = 400
_registered = False


class PretrainedUnavailableError(RuntimeError):
    """Pretrained weights named by a tag cannot be obtained (offline, or the tag is unknown)."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint does not fit the architecture it is loaded into; the message names file, keys, model."""


def project_model_names() -> list[str]:
    """Architectures shipped with this project (one JSON per architecture)."""
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


def register_project_models() -> list[str]:
    """Make the project's architectures known to open_clip; safe to call any number of times.

    open_clip appends every registered path to a list and rescans all of them, so registering twice
    would only waste time; a module flag keeps it to once per process.
    """
    global _registered
    if not _registered:
        if not set(project_model_names()) <= set(open_clip.list_models()):
            open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True
    return project_model_names()


def model_config(model_name: str) -> dict[str, Any]:
    """The open_clip config (embed_dim, vision_cfg, text_cfg) of an architecture, or a clear error."""
    register_project_models()
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ValueError(
            f"unknown architecture {model_name!r}; project architectures: {', '.join(project_model_names())} "
            "(JSON files in soups/model_configs/), or any name of open_clip.list_models()"
        )
    return config


def model_embed_dim(model_name: str) -> int:
    """Width of the joint image-text embedding, i.e. the head's input size."""
    return int(model_config(model_name)["embed_dim"])


class ClipClassifier(nn.Module):
    """Image encoder + linear head on L2-normalised features (the paper's fine-tuning model).

    The head's weight is the zero-shot text head times the CLIP logit scale, so an untouched classifier
    gives exactly CLIP's zero-shot logits and fine-tuning starts from them.
    """

    def __init__(self, visual: nn.Module, head: nn.Linear, model_name: str = "") -> None:
        super().__init__()
        self.visual = visual
        self.head = head
        self.model_name = model_name

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings, as CLIP compares them with text embeddings."""
        return F.normalize(self.visual(images), dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    @property
    def num_classes(self) -> int:
        return self.head.out_features


# ------------------------------------------------------------------------------- pretrained weights


def _hub_reachable() -> bool:
    """Quick TCP probe of the Hugging Face endpoint; a proxy in the environment is trusted to route."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    host, _, port = endpoint.partition(":")
    try:
        with socket.create_connection((host, int(port or 443)), timeout=_HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


@contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Put huggingface_hub in offline mode for one call, so an unreachable hub fails in milliseconds.

    huggingface_hub reads HF_HUB_OFFLINE once at import, so setting the environment variable later has no
    effect; its module constant is what every request checks. Without this, each missing file costs
    about 45 s of retries.
    """
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = previous or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _how_to_point_locally(model_name: str) -> str:
    return (
        f"point model.pretrained at a local checkpoint of {model_name!r} instead: "
        "'pretrained: /path/to/checkpoint.safetensors' (or .pt), or 'pretrained: local-dir:/dir' holding "
        "open_clip_config.json and the weights; `soups.pretrain` makes one offline"
    )


def _first_keys(keys: Sequence[str]) -> str:
    shown = ", ".join(list(keys)[:_KEYS_SHOWN])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > _KEYS_SHOWN else shown


def _from_local_dir(model_name: str, start: PretrainedStart, device: str) -> tuple[nn.Module, Any, Any, str]:
    folder = start.path
    if not folder.is_dir():
        raise FileNotFoundError(f"pretrained folder {folder} (from {start.text!r}) does not exist")
    if not (folder / "open_clip_config.json").is_file():
        raise FileNotFoundError(
            f"pretrained folder {folder} has no open_clip_config.json; add one or point at a checkpoint file"
        )
    identifier = local_dir(folder)
    local_cfg = open_clip.get_model_config(identifier)
    expected = open_clip.get_model_config(model_name)
    if expected is not None and local_cfg != expected:
        raise CheckpointMismatchError(
            f"{folder}/open_clip_config.json describes another architecture than {model_name!r}; "
            f"set model.name to match the folder or use a checkpoint of {model_name!r}"
        )
    model, train_tf, eval_tf = open_clip.create_model_and_transforms(identifier, device=device)
    return model, train_tf, eval_tf, identifier


def _from_file(model_name: str, start: PretrainedStart, device: str) -> tuple[nn.Module, Any, Any]:
    path = start.path
    if not path.is_file():
        raise FileNotFoundError(f"pretrained checkpoint {path} does not exist (model.pretrained={start.text!r})")
    try:
        return open_clip.create_model_and_transforms(model_name, pretrained=str(path), device=device)
    except pickle.UnpicklingError:  # torch's own message advises weights_only=False, which would run the file's code
        raise CheckpointMismatchError(
            f"{path} is a pickle that needs code to load, which is never run here; convert it to safetensors "
            "(or a plain state dict) where you trust it, then point model.pretrained at that file"
        ) from None
    except (RuntimeError, AssertionError, ValueError) as err:  # open_clip asserts on some shape mismatches
        detail = " ".join(str(err).split()) or type(err).__name__
        detail = detail if len(detail) <= _DETAIL_CHARS else detail[:_DETAIL_CHARS] + " ..."
        raise CheckpointMismatchError(
            f"{path} is not a full open_clip checkpoint of architecture {model_name!r} ({detail}); "
            "a fine-tuned classifier checkpoint (visual.* + head.*) loads with soups.models.load_classifier"
        ) from err


def _from_tag(model_name: str, tag: str, device: str) -> tuple[nn.Module, Any, Any]:
    known = open_clip.list_pretrained_tags_by_model(model_name)
    if tag not in known:
        raise PretrainedUnavailableError(
            f"pretrained tag {tag!r} is not known for architecture {model_name!r} "
            f"(known tags: {', '.join(known) or 'none'}) and is not an existing file; "
            + _how_to_point_locally(model_name)
        )
    offline = not _hub_reachable()
    try:
        with _hub_offline(offline):
            return open_clip.create_model_and_transforms(model_name, pretrained=tag, device=device)
    except RuntimeError as err:
        reason = "the Hugging Face hub is unreachable and the weights are not cached" if offline else str(err)
        raise PretrainedUnavailableError(
            f"cannot load pretrained tag {tag!r} of architecture {model_name!r}: {reason}; "
            + _how_to_point_locally(model_name)
        ) from err


@contextmanager
def _quiet_random_init() -> Iterator[None]:
    """open_clip warns on the root logger whenever no weights are given; here that is the intent (random init,
    or a shell about to receive a checkpoint), so the warning would only mislead."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def create_clip(
    model_name: str, pretrained: str | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Transform, Transform, str]:
    """The full open_clip model with its (train, eval) transforms and the name its tokenizer goes by.

    ``pretrained``: None (random init), a checkpoint file (.safetensors/.pt), ``local-dir:/dir``, or an
    open_clip tag. Tags are only tried when the hub answers, or from the local cache, so offline runs
    fail at once with `PretrainedUnavailableError` instead of minutes of retries.
    """
    model_config(model_name)
    device = str(device)
    start = parse_pretrained(pretrained)
    if start.kind == "none":
        with _quiet_random_init():
            model, train_tf, eval_tf = open_clip.create_model_and_transforms(model_name, device=device)
        return model, train_tf, eval_tf, model_name
    if start.kind == "local_dir":
        return _from_local_dir(model_name, start, device)
    if start.kind == "file":
        return (*_from_file(model_name, start, device), model_name)
    if start.kind == "registry":
        raise ValueError(f"model.pretrained {pretrained!r} is a registry URI; fetch it first (flows/trial.py)")
    return (*_from_tag(model_name, pretrained, device), model_name)


# ------------------------------------------------------------------------------------- the classifier


@torch.no_grad()
def zero_shot_weights(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
) -> torch.Tensor:
    """[n_classes, embed_dim] unit rows: per class, mean of the unit text embeddings of every prompt.

    Averaging normalised prompt embeddings and renormalising is the paper's (and CLIP's) ensembling;
    it makes the head robust to any single template's wording.
    """
    if not classnames or not templates:
        raise ValueError("zero-shot head needs at least one class name and one template")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = []
    for name in classnames:
        tokens = tokenizer([template.format(name) for template in templates]).to(device)
        prompts = F.normalize(model.encode_text(tokens), dim=-1)
        rows.append(F.normalize(prompts.mean(dim=0), dim=-1))
    model.train(was_training)
    return torch.stack(rows)


def classifier_from_clip(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    model_name: str = "",
) -> ClipClassifier:
    """Zero-shot classifier sharing ``model.visual`` (not a copy); the text tower is not referenced."""
    weights = zero_shot_weights(model, tokenizer, classnames, templates)
    head = nn.Linear(weights.shape[1], weights.shape[0]).to(weights.device)
    with torch.no_grad():
        head.weight.copy_(weights * model.logit_scale.detach().exp())
        head.bias.zero_()
    return ClipClassifier(model.visual, head, model_name).eval()


def build_classifier(
    model_name: str,
    pretrained: str | None,
    classnames: Sequence[str],
    templates: Sequence[str],
    device: str | torch.device = "cpu",
) -> ClipClassifier:
    """Zero-shot classifier in eval mode; its preprocessing is read off it with `soups.evaluate.Preprocess.of`."""
    model, _, _, tokenizer_name = create_clip(model_name, pretrained, device)
    tokenizer = open_clip.get_tokenizer(tokenizer_name)
    classifier = classifier_from_clip(model, tokenizer, classnames, templates, model_name)
    del model  # the text tower goes with it; only `visual` survives inside the classifier
    return classifier


def empty_classifier(model_name: str, num_classes: int, device: str | torch.device = "cpu") -> ClipClassifier:
    """Randomly initialised classifier of the right shapes, to load a checkpoint into."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    model, _, _, _ = create_clip(model_name, None, device)
    head = nn.Linear(model_embed_dim(model_name), num_classes).to(device)
    return ClipClassifier(model.visual, head, model_name).eval()


def classifier_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    model_name: str,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
    source: str = "state dict",
) -> ClipClassifier:
    """Classifier holding ``state_dict`` (a soup, say), loaded strictly; ``num_classes`` defaults to its head.

    Keys and shapes are compared first so the error lists what differs instead of torch's wall of text.
    """
    if num_classes is None:
        if "head.weight" not in state_dict:
            raise CheckpointMismatchError(f"{source} has no head.weight; it is not a classifier checkpoint")
        num_classes = int(state_dict["head.weight"].shape[0])
    classifier = empty_classifier(model_name, num_classes, device)
    expected = classifier.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys: {_first_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_first_keys(unexpected)}")
        if wrong:
            parts.append(f"shape mismatches (file vs model): {_first_keys(wrong)}")
        raise CheckpointMismatchError(
            f"{source} does not fit architecture {model_name!r} with {num_classes} classes; " + "; ".join(parts)
        )
    classifier.load_state_dict(dict(state_dict), strict=True)
    return classifier


def load_classifier(
    checkpoint_path: str | Path, model_name: str, num_classes: int, device: str | torch.device = "cpu"
) -> ClipClassifier:
    """Classifier from a safetensors file written by `save_classifier` (or a soup of such files)."""
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier checkpoint {path} does not exist")
    state_dict = load_state_dict(path)
    return classifier_from_state_dict(state_dict, model_name, num_classes, device, source=str(path))


def save_classifier(classifier: ClipClassifier, path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``visual.* + head.*`` atomically as safetensors, with the architecture in the metadata."""
    info = {"model_name": classifier.model_name, "num_classes": str(classifier.num_classes)}
    return save_state_dict(classifier.state_dict(), Path(path), {**info, **dict(metadata or {})})
