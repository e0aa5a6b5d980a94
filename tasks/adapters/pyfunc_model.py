"""MLflow model-from-code for a promoted classifier: logged as this file plus the safetensors weights and a
JSON spec as artifacts, so loading it never unpickles a Python object."""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class SoupClassifier(PythonModel):
    """For a batch of uint8 RGB images [B, H, W, 3]: one row per image, ``predicted_class`` (the class name)
    then the probability of every class, in columns named after the classes."""

    def load_context(self, context) -> None:
        from soups.serving import load_packaged

        self.classifier, self.spec = load_packaged(context.artifacts["weights"], context.artifacts["spec"])

    def predict(self, context, model_input: np.ndarray, params: dict | None = None):
        """The hint is one MLflow takes as is (no schema inferred from it, no warning): the logged signature
        is what checks the input."""
        import pandas as pd

        from soups.serving import PREDICTED, predict_proba

        probabilities = predict_proba(self.classifier, self.spec, np.asarray(model_input))
        names = list(self.spec.classnames)
        table = pd.DataFrame(probabilities, columns=names)
        table.insert(0, PREDICTED, [names[i] for i in probabilities.argmax(axis=1)])
        return table


mlflow.models.set_model(SoupClassifier())
