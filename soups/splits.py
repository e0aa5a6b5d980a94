"""The names of the evaluation splits and of the scores computed from them, defined once: the leaderboard's
columns, the metrics of every run and the keys of every score dict are these strings."""

from __future__ import annotations

HELDOUT = "heldout"
"""The scoring part of the held-out split: the one score that selects (greedy, tuning, promotion)."""
HELDOUT_LOSS = "heldout_loss"
TEST = "test"
SHIFT_MEAN = "shift_mean"
"""Mean accuracy over the reported shift sets: the paper's OOD score."""
OOD_VAL_MEAN = "ood_val_mean"
"""Mean accuracy over the ood-validation sets (shifts made from held-out images), which may select."""
OOD_VAL_PREFIX = "oodval_"


def ood_val_split(name: str) -> str:
    """The evaluator's split of the ood-validation set ``name`` (data.ood_val)."""
    return f"{OOD_VAL_PREFIX}{name}"
