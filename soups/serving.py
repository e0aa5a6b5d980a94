"""A classifier packaged as plain files, usable outside the platform: safetensors weights plus a JSON spec.

The MLflow pyfunc wrapper (``tasks/pyfunc_model.py``) and anyone holding the two files load the same torch
module through `load_packaged`; nothing is pickled.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from soups.images import Preprocess
from soups.models import ClipClassifier, load_classifier

WEIGHTS_FILE = "weights.safetensors"
SPEC_FILE = "classifier.json"


@dataclass(frozen=True)
class ClassifierSpec:
    """What it takes to rebuild the module and feed it: architecture, classes, preprocessing."""

    model_name: str
    classnames: list[str]
    preprocess: Preprocess

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "preprocess": asdict(self.preprocess)}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> ClassifierSpec:
        raw = json.loads(text)
        pre = raw["preprocess"]
        preprocess = Preprocess(int(pre["size"]), tuple(pre["mean"]), tuple(pre["std"]), pre["interpolation"])
        return cls(raw["model_name"], list(raw["classnames"]), preprocess)


def write_spec(spec: ClassifierSpec, folder: Path) -> Path:
    path = Path(folder) / SPEC_FILE
    path.write_text(spec.to_json())
    return path


def load_packaged(weights: Path, spec_path: Path, device: str = "cpu") -> tuple[ClipClassifier, ClassifierSpec]:
    """The torch classifier and its spec, from the two packaged files."""
    spec = ClassifierSpec.from_json(Path(spec_path).read_text())
    classifier = load_classifier(weights, spec.model_name, len(spec.classnames), device=device)
    return classifier.eval(), spec


PREDICTED = "predicted_class"
"""The served model's first output column: the most probable class's name (then one column per class)."""


@torch.inference_mode()
def predict_proba(classifier: ClipClassifier, spec: ClassifierSpec, images: np.ndarray) -> np.ndarray:
    """Class probabilities for a batch of uint8 RGB images [B, H, W, 3] at the model's resolution."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images shaped [batch, height, width, 3], got shape {images.shape}")
    if images.dtype != np.uint8:  # a silent cast would turn 0..1 floats into black images and a confident answer
        raise ValueError(f"expected uint8 pixels 0..255, got {images.dtype}; use (x * 255).round().astype('uint8')")
    batch = torch.as_tensor(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    batch = spec.preprocess.resize()(batch)
    device = next(classifier.parameters()).device
    logits = classifier(spec.preprocess.normalize(batch.to(device)))
    return torch.softmax(logits.float(), dim=-1).cpu().numpy()
