"""No library noise in normal output: Optuna's ExperimentalWarning for the experimental APIs the sweep uses on
purpose (metric names, QMC, heartbeats) and MLflow's coloured type-hint UserWarning on every packaged model."""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest

from soups.config import load_config
from tasks.adapters.studies import open_study


@pytest.mark.parametrize("sampler", ["tpe", "qmc"])
def test_opening_a_study_warns_nothing(tmp_path, sampler):
    config = load_config(None, {"tracking.root": str(tmp_path), "sweep.sampler": sampler})
    heartbeat = "Heartbeat of storage is supposed to be used with Study.optimize"  # studies.py ignores it at import
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message=heartbeat)
        study = open_study(config)
        study.tell(study.ask(), 0.5)
        open_study(config)  # resumed: a new sampler is made
    assert [str(w.message) for w in caught] == []
    with pytest.warns(Warning):  # the filter is narrow: other warnings still show
        warnings.warn("still shown", UserWarning, stacklevel=1)


def test_the_packaged_model_code_defines_its_predict_without_mlflows_type_hint_warning():
    sys.modules.pop("tasks.adapters.pyfunc_model", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module("tasks.adapters.pyfunc_model")
    assert module.SoupClassifier.predict.__annotations__["model_input"] in ("np.ndarray", module.np.ndarray)
    assert [str(w.message) for w in caught if "type hint" in str(w.message).lower()] == []
