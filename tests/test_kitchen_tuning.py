"""The kitchen tunes a recipe's options on held-out, names repeated recipes by label, and skips recipes whose
inputs it lacks (fine-tunes made elsewhere, no zero-shot start)."""

from __future__ import annotations

import pytest
import torch

from soups.checkpoint import load_state_dict
from soups.config import ConfigError, RecipeChoice, load_config
from soups.cooking import cook_and_score, prepare_cooking
from soups.recipes import get_recipe
from tests.helpers import perturbed_pool


@pytest.fixture(scope="module")
def kitchen(tmp_path_factory):
    """A random-init start (pretrain: null) and three ingredients perturbed from it."""
    config = load_config(None, {"pretrain": None, "kitchen.bootstrap": 0})
    work = tmp_path_factory.mktemp("kitchen")
    setup = prepare_cooking(config, work)
    pool = perturbed_pool(setup.recipe_inputs.base, work, seed=0)
    return setup, pool


def test_a_grid_is_tuned_on_heldout_and_keeps_the_whole_curve(kitchen, tmp_path):
    setup, pool = kitchen
    choice = RecipeChoice(name="task_arithmetic", label="ta_tuned", grid={"lambda": [0.0, 0.5, 1.0]})
    (candidate,) = cook_and_score(setup, choice, pool, tmp_path)
    curve = candidate.grid
    assert [point["options"] for point in curve] == [{"lambda": 0.0}, {"lambda": 0.5}, {"lambda": 1.0}]
    best = max(curve, key=lambda point: (point["heldout"], -point["heldout_loss"]))
    assert candidate.tuned == best["options"], "the held-out scoring split chooses"
    assert candidate.name == "ta_tuned" and candidate.recipe == "task_arithmetic"
    assert candidate.scores["heldout"] == pytest.approx(best["heldout"])


def test_a_labelled_greedy_variant_builds_its_candidates_with_another_recipe(kitchen, tmp_path):
    setup, pool = kitchen
    choice = RecipeChoice(name="greedy", label="greedy_ties", options={"combine": "ties"})
    (candidate,) = cook_and_score(setup, choice, pool, tmp_path)
    assert candidate.name == "greedy_ties" and candidate.details.combine == "ties"
    assert len(candidate.details.trajectory) == len(pool)


def test_the_default_kitchen_cooks_greedy_variants_and_grids_are_validated():
    config = load_config()
    keys = [choice.key for choice in config.kitchen.recipes]
    assert {"greedy", "greedy_ties", "greedy_task_arithmetic", "ties", "task_arithmetic", "model_stock"} <= set(keys)
    with pytest.raises(ConfigError, match="allowed options"):
        load_config(None, {"kitchen.recipes": [{"name": "ties", "grid": {"densty": [0.1]}}]})
    with pytest.raises(ConfigError, match="distinct label"):
        load_config(None, {"kitchen.recipes": ["greedy", {"name": "greedy", "options": {"combine": "ties"}}]})


def test_without_a_start_the_kitchen_scores_with_the_architecture_and_lacks_only_the_base(tmp_path):
    config = load_config(None, {"tracking.root": str(tmp_path)})  # pretrain configured, never run
    from soups.pretrain import has_start, with_resolved_start

    config = with_resolved_start(config, missing_ok=True)
    assert not has_start(config)
    setup = prepare_cooking(config, tmp_path / "work")
    assert setup.recipe_inputs.base is None
    assert setup.recipe_inputs.missing(get_recipe("wise_ft").needs) == ["base"]
    assert setup.recipe_inputs.missing(get_recipe("uniform").needs + get_recipe("greedy").needs) == []


def test_the_linear_probe_freezes_the_start_and_picks_its_weight_decay_on_heldout(kitchen, tmp_path):
    setup, pool = kitchen
    (probe,) = cook_and_score(setup, RecipeChoice(name="linear_probe", options={"steps": 100}), pool, tmp_path)
    (zero_shot,) = cook_and_score(setup, RecipeChoice(name="zero_shot"), pool, tmp_path)
    start, weights = load_state_dict(setup.recipe_inputs.base), load_state_dict(probe.checkpoint)
    assert all(torch.equal(weights[k], start[k]) for k in start if k.startswith("visual.")), "the tower is frozen"
    assert not torch.equal(weights["head.weight"], start["head.weight"])
    curve = probe.details.curve
    assert [point["weight_decay"] for point in curve] == [0.0, 1e-4, 1e-3, 1e-2, 1e-1]
    assert probe.details.weight_decay == max(curve, key=lambda point: point["heldout"])["weight_decay"]
    assert probe.details.train_images == len(setup.recipe_inputs.train_images)
    assert probe.scores["heldout"] > zero_shot.scores["heldout"], "a trained head beats a random start's text head"
