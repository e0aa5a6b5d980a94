"""Choices are made on held-out data only: tie-breaks, ood-validation sets, and how much of a lead is noise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from soups.candidates import Candidate, promotable
from soups.config import DataConfig, load_config
from soups.cooking import prepare_cooking
from soups.data import load_dataset
from soups.intervals import bootstrap_interval, paired_difference
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
    assert max([robust, calibrated], key=Candidate.key) is calibrated
    small = _candidate("small", "greedy", 0.90, 0.30, shift_mean=0.0, ingredients=1)
    ranked = sorted([robust, calibrated, small], key=Candidate.key)
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


def _hits(right: int, wrong: int, extra_right: int = 0) -> torch.Tensor:
    """Per-image correctness: the first ``right`` images right, then ``extra_right`` more, the rest wrong."""
    return torch.tensor([True] * (right + extra_right) + [False] * (wrong - extra_right))


def _paired(first, second, score):
    return paired_difference([first[score]], [second[score]], 1000, seed=0)


def test_a_paired_test_resolves_what_overlapping_intervals_do_not():
    """Two models that agree on 390 of 400 images and differ on 10, all in the first's favour: per-model
    intervals overlap widely, the paired difference (+2.5 points) does not include 0."""
    second = _hits(300, 100)
    first = _hits(300, 100, extra_right=10)
    low1, high1 = bootstrap_interval([first], 1000, seed=0)
    low2, high2 = bootstrap_interval([second], 1000, seed=0)
    assert low1 < high2, "the per-model intervals overlap: the old test called this unresolved"
    paired = paired_difference([first], [second], 1000, seed=0)
    assert paired.difference == pytest.approx(0.025) and paired.resolved and 0 < paired.low <= paired.high
    same = paired_difference([first], [first], 1000, seed=0)
    assert (same.difference, same.low, same.high) == (0.0, 0.0, 0.0) and not same.resolved
    swapped = second.clone()
    swapped[:5], swapped[300:305] = False, True  # 5 images lost, 5 gained
    assert not paired_difference([swapped], [second], 1000, seed=0).resolved, "5 up, 5 down: no difference"
    with pytest.raises(ValueError, match="same images"):
        paired_difference([first], [second[:-1]], 100, seed=0)


def test_the_promotion_margin_is_a_paired_test_on_the_same_images():
    def registered(name, hits):
        score = float(hits.float().mean())
        return RegisteredCandidate(
            name=name, recipe=name, version=name[-1], scores={"heldout": score}, ingredients=2, hits={"heldout": hits}
        )

    winner = registered("greedy-1", _hits(300, 100, extra_right=10))
    assert "resolved by this data" in margin_note("heldout", winner, registered("uniform-2", _hits(300, 100)), _paired)
    near = registered("uniform-2", _hits(300, 100, extra_right=9))
    note = margin_note("heldout", winner, near, _paired)
    assert "not resolved" in note and "paired 95 % interval" in note
    no_hits = RegisteredCandidate(name="u-3", recipe="u", version="3", scores={"heldout": 0.7}, ingredients=2)
    assert "no paired interval" in margin_note("heldout", winner, no_hits, _paired)


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


def test_leaderboard_and_reproduction_report_judge_the_papers_comparisons_paired():
    hits = {  # on 400 test images: greedy = best_single + 2 images (unresolved), uniform = best_single - 40
        "best_single": _hits(360, 40),
        "greedy": _hits(360, 40, extra_right=2),
        "uniform": _hits(320, 80),
    }
    rows = [
        _candidate("best_single", "best", 0.90, 0.3, 0.40, ingredients=1, test=0.90),
        _candidate("greedy", "greedy", 0.92, 0.3, 0.45, test=0.905),
        _candidate("uniform", "uniform", 0.80, 0.5, 0.60, ingredients=5, test=0.80),
    ]
    for row in rows:
        row.intervals = {k: (v - 0.03, min(1.0, v + 0.03)) for k, v in row.scores.items() if k != "heldout_loss"}
        row.hits = {"test": hits[row.name], "shift_mean": hits[row.name]}
    board = leaderboard(rows)
    printed = format_leaderboard(board)
    assert "0.9200 [0.89,0.95]" in printed and "heldout_lo" not in printed

    def compare(first, second, score):
        return _paired(hits_of[first], hits_of[second], score)

    hits_of = {row.name: row.hits for row in rows}
    report = reproduction_report(
        board, study="s", split_sizes={"heldout": 89}, figures=["a.png"], resamples=1000, compare=compare
    )
    assert "Images per split: heldout 89." in report
    assert "| greedy | 92.0 (89.0–95.0)" in report
    assert "paired bootstrap" in report.split("## What the data resolves")[1]
    assert "- test: greedy vs best_single: not resolved, greedy − best_single = +0.5 points [" in report
    assert "- test: **best_single > uniform**: uniform − best_single = -10.0 points [" in report
    assert "![a.png](a.png)" in report
    assert "Ingredients left out" not in report

    skipped = {"7": "NonFiniteTensorError: w holds NaN"}
    noted = reproduction_report(
        board, study="s", split_sizes={}, figures=[], resamples=0, compare=lambda *_: None, skipped=skipped
    )
    assert "## Ingredients left out\n\n- version 7: NonFiniteTensorError: w holds NaN" in noted
    assert "(no intervals: kitchen.bootstrap is 0)" in noted


def test_in_sample_scores_are_marked_and_never_promote():
    learned = _candidate("learned", "learned", 0.99, 0.1, 0.5)
    learned.in_sample = ["heldout", "heldout_loss"]
    greedy = _candidate("greedy", "greedy", 0.90, 0.3, 0.5)
    board = leaderboard([learned, greedy])
    assert "0.9900*" in format_leaderboard(board)
    report = reproduction_report(
        board, study="s", split_sizes={}, figures=[], resamples=0, compare=lambda *_: None, whole_heldout=True
    )
    assert "| learned | 99.0* |" in report and "in-sample" in report
    assert learned.details_json()["in_sample"] == ["heldout", "heldout_loss"]


@pytest.mark.parametrize("metric", ["shift_mean", "test"])
def test_no_config_can_promote_on_test_derived_data(metric):
    with pytest.raises(Exception, match="promotion_metric"):
        load_config(None, {"kitchen.promotion_metric": metric})
