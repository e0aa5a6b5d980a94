"""Choices are made on held-out data only: tie-breaks, ood-validation sets, and how much of a lead is noise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from soups.config import DataConfig, load_config
from soups.cooking import Candidate, prepare_cooking, promotable, selection_key
from soups.data import load_dataset
from soups.intervals import bootstrap_interval
from soups.report import format_leaderboard, leaderboard
from soups.reproduction import reproduction_report
from tasks.promotion import margin_note
from tasks.registration import RegisteredCandidate


def _candidate(name, recipe, heldout, loss, shift_mean, ingredients=3, test=0.5) -> Candidate:
    scores = {"heldout": heldout, "heldout_loss": loss, "test": test, "shift_mean": shift_mean}
    return Candidate(name, recipe, [f"i{k}" for k in range(ingredients)], scores, checkpoint=None)


def test_ties_on_heldout_go_to_lower_loss_then_fewer_ingredients_never_to_shift_mean():
    robust = _candidate("robust", "uniform", 0.90, 0.40, shift_mean=0.95, test=0.99)
    calibrated = _candidate("calibrated", "greedy", 0.90, 0.30, shift_mean=0.10, test=0.10)
    assert max([robust, calibrated], key=lambda c: selection_key("heldout", c.scores, len(c.ingredients))) is calibrated
    small = _candidate("small", "greedy", 0.90, 0.30, shift_mean=0.0, ingredients=1)
    ranked = sorted([robust, calibrated, small], key=lambda c: selection_key("heldout", c.scores, len(c.ingredients)))
    assert [c.name for c in ranked[::-1]] == ["small", "calibrated", "robust"]
    board = leaderboard([robust, calibrated, small])
    assert list(board.model) == ["small", "calibrated", "robust"], "the leaderboard orders as selection does"


def test_the_best_wise_ft_alpha_is_chosen_by_heldout_not_by_shift():
    alphas = [_candidate(f"wise_ft_{a}", "wise_ft", 0.8, 0.5 - a / 10, shift_mean=1 - a, ingredients=1) for a in (1, 2)]
    for alpha in alphas:
        alpha.checkpoint = Path(f"{alpha.name}.safetensors")  # single models; promotable never opens the file
    chosen = [c.name for c in promotable([*alphas]) if c.recipe == "wise_ft"]
    assert chosen == ["wise_ft_2"], "equal held-out accuracy: lower held-out loss wins, whatever the shift mean"


def test_bootstrap_intervals_are_seeded_contain_the_accuracy_and_shrink_with_more_images():
    small = torch.tensor([True] * 45 + [False] * 5)
    large = small.repeat(20)
    low, high = bootstrap_interval([small], 1000, seed=0)
    assert low < 0.9 < high and bootstrap_interval([small], 1000, seed=0) == (low, high)
    large_low, large_high = bootstrap_interval([large], 1000, seed=0)
    assert large_high - large_low < (high - low) / 2
    assert bootstrap_interval([torch.ones(30, dtype=torch.bool)], 200, seed=1) == (1.0, 1.0)


def test_the_promotion_log_says_when_the_lead_is_inside_the_noise():
    def registered(name, score, interval):
        return RegisteredCandidate(
            name=name, recipe=name, version=name[-1], scores={"heldout": score}, intervals=interval, ingredients=2
        )

    winner = registered("greedy-1", 0.91, {"heldout": (0.85, 0.96)})
    assert "not resolved" in margin_note("heldout", winner, registered("uniform-2", 0.89, {}))
    assert "outside the interval" in margin_note("heldout", winner, registered("uniform-2", 0.70, {}))
    assert "no interval" in margin_note("heldout", registered("greedy-1", 0.91, {}), registered("u-2", 0.7, {}))


def test_reported_shift_sets_and_ood_validation_sets_never_share_source_images_with_the_wrong_side():
    bundle = load_dataset(DataConfig(ood_val=["rotate", "noise"]))
    selection = set(bundle.heldout.indices) | set(bundle.train.indices)
    reported = set().union(*(set(d.indices) for d in bundle.shifts.values()))
    assert reported.isdisjoint(selection), "reported shifts are built from test images only"
    for name, dataset in bundle.ood_val.items():
        assert set(dataset.indices) <= set(bundle.heldout.indices), f"{name} is built from held-out images"
        assert set(dataset.indices).isdisjoint(bundle.test.indices), f"{name} never sees a test image"


def test_the_kitchen_scores_ood_validation_on_the_scoring_part_only(tmp_path):
    config = load_config(None, {"data.ood_val": ["noise"], "pretrain": None, "kitchen.bootstrap": 50})
    setup = prepare_cooking(config, tmp_path)
    splits = setup.evaluator.splits
    assert torch.equal(splits["oodval_noise"].labels, splits["heldout"].labels), "the same rows as the scoring part"
    fit = setup.recipe_inputs.fit_batches
    assert len(fit) + len(splits["heldout"]) == len(load_dataset(config.data).heldout)
    report = setup.evaluator.report()
    assert {"oodval_noise", "ood_val_mean", "shift_mean"} <= set(report.scores)
    assert "oodval_noise" not in setup.evaluator.shifts, "ood-validation sets are not reported shifts"
    assert set(report.intervals) >= {"heldout", "test", "shift_mean", "ood_val_mean"}


def test_leaderboard_and_reproduction_report_show_intervals_and_only_resolved_orderings():
    rows = [
        _candidate("best_single", "best", 0.90, 0.3, 0.40, ingredients=1, test=0.90),
        _candidate("greedy", "greedy", 0.92, 0.3, 0.45, test=0.91),
        _candidate("uniform", "uniform", 0.80, 0.5, 0.60, ingredients=5, test=0.60),
    ]
    for row in rows:
        row.intervals = {k: (v - 0.03, min(1.0, v + 0.03)) for k, v in row.scores.items() if k != "heldout_loss"}
    board = leaderboard(rows)
    printed = format_leaderboard(board)
    assert "0.9200 [0.89,0.95]" in printed and "heldout_lo" not in printed
    report = reproduction_report(board, study="s", split_sizes={"heldout": 89}, figures=["a.png"], resamples=1000)
    assert "| greedy | 92.0 (89.0–95.0)" in report
    assert "greedy vs best_single: not resolved" in report, "0.91 vs 0.90 overlaps: no claim"
    assert "**best_single > uniform**" in report, "0.90 vs 0.60 is outside the intervals"
    assert "![a.png](a.png)" in report
    assert "Ingredients left out" not in report

    skipped = {"7": "NonFiniteTensorError: w holds NaN"}
    noted = reproduction_report(board, study="s", split_sizes={}, figures=[], resamples=0, skipped=skipped)
    assert "## Ingredients left out\n\n- version 7: NonFiniteTensorError: w holds NaN" in noted


@pytest.mark.parametrize("metric", ["shift_mean", "test"])
def test_no_config_can_promote_on_test_derived_data(metric):
    with pytest.raises(Exception, match="promotion_metric"):
        load_config(None, {"kitchen.promotion_metric": metric})
