"""MLflow model-from-code for a promoted classifier: logged as this file plus the safetensors weights and a
JSON spec as artifacts, so loading it never unpickles a Python object."""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class SoupClassifier(PythonModel):
    """Predicts class probabilities for a batch of uint8 RGB images [B, H, W, 3]."""

    def load_context(self, context) -> None:
        from soups.serving import load_packaged

        self.classifier, self.spec = load_packaged(context.artifacts["weights"], context.artifacts["spec"])

    def predict(self, context, model_input, params=None):
        import numpy as np

        from soups.serving import predict_proba

        return predict_proba(self.classifier, self.spec, np.asarray(model_input))


mlflow.models.set_model(SoupClassifier())
