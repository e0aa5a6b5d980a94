"""Log a classifier as an MLflow pyfunc model from code: weights (safetensors) and a JSON spec as artifacts,
a signature, explicit pip requirements and the ``soups`` package as code; nothing pickled."""

from __future__ import annotations

import shutil
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np

from soups.config import PipelineConfig
from soups.kitchen import KitchenSetup
from soups.serving import WEIGHTS_FILE, ClassifierSpec, write_spec

MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
SOUPS_PACKAGE = Path(__file__).resolve().parent.parent / "soups"


def pip_requirements() -> list[str]:
    pinned = ["torch", "torchvision", "open_clip_torch", "safetensors", "numpy", "pydantic", "pandas", "scikit-learn"]
    return [f"{name}=={metadata.version(name)}" for name in pinned]


def log_classifier_model(config: PipelineConfig, run_id: str, checkpoint: Path, setup: KitchenSetup, folder: Path):
    """Log under ``run_id`` as the model 'classifier'; returns MLflow's ModelInfo (model_uri, model_id)."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS_FILE
    shutil.copyfile(checkpoint, weights)
    bundle_classes = setup.kitchen.module.num_classes
    size = setup.evaluator.preprocess.size
    spec = ClassifierSpec(config.model.name, _classnames(config, bundle_classes), setup.evaluator.preprocess)
    spec_path = write_spec(spec, folder)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, size, size, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, bundle_classes))]),
    )
    uri = config.tracking.resolved_mlflow_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # The signature is explicit and an input example would cost a prediction per logged model.
        warnings.filterwarnings("ignore", message=".*(input example|type hints).*")
        return mlflow.pyfunc.log_model(
            name="classifier",
            python_model=str(MODEL_CODE),
            artifacts={"weights": str(weights), "spec": str(spec_path)},
            code_paths=[str(SOUPS_PACKAGE)],
            pip_requirements=pip_requirements(),
            signature=signature,
        )


def _classnames(config: PipelineConfig, count: int) -> list[str]:
    from soups.evaluate import bundle_for

    names = bundle_for(config.data).classnames
    assert len(names) == count, "the classifier head and the dataset disagree on the number of classes"
    return list(names)
