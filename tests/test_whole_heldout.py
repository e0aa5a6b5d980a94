"""The official protocol (`kitchen.learned_fit_fraction: 0`): learned soups fit on the whole held-out split,
greedy scores it whole, and the learned soups' held-out scores are in-sample: marked, and never promoted on."""

from __future__ import annotations

import pytest

from soups.config import RecipeChoice, load_config
from soups.cooking import cook_and_score, prepare_cooking
from soups.data import load_dataset
from tasks.promotion import eligible
from tasks.registration import RegisteredCandidate
from tests.helpers import perturbed_pool


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    config = load_config(None, {"pretrain": None, "kitchen.bootstrap": 0, "kitchen.learned_fit_fraction": 0})
    work = tmp_path_factory.mktemp("whole")
    setup = prepare_cooking(config, work)
    return config, setup, perturbed_pool(setup.recipe_inputs.base, work, seed=1)


def test_learned_soups_fit_on_and_greedy_scores_the_whole_heldout_split(whole):
    config, setup, _ = whole
    heldout = load_dataset(config.data).heldout
    assert len(setup.recipe_inputs.fit_batches) == len(setup.evaluator.splits["heldout"]) == len(heldout)
    assert setup.fit_scored == ("heldout", "heldout_loss")
    split = load_config(None, {"pretrain": None, "kitchen.bootstrap": 0})
    assert split.kitchen.learned_fit_fraction == 0.5, "the default keeps fitting and scoring apart"


def test_learned_scores_are_in_sample_and_never_promote_greedy_ones_do(whole, tmp_path):
    _, setup, pool = whole
    (learned,) = cook_and_score(setup, RecipeChoice(name="learned", options={"epochs": 1}), pool, tmp_path)
    (greedy,) = cook_and_score(setup, RecipeChoice(name="greedy"), pool, tmp_path)
    assert learned.in_sample == ["heldout", "heldout_loss"] and learned.tags()["in_sample"] == "heldout,heldout_loss"
    assert greedy.in_sample == [], "greedy selects on held-out, as the paper's protocol does; it fits nothing there"
    assert len(greedy.details.trajectory) == len(pool)

    def registered(c, version):
        return RegisteredCandidate(
            name=c.name, recipe=c.recipe, version=version, scores=c.scores, ingredients=3, in_sample=c.in_sample
        )

    chosen = eligible([registered(learned, "1"), registered(greedy, "2")], "heldout")
    assert [c.name for c in chosen] == ["greedy"]


def test_the_split_protocol_marks_nothing_in_sample(tmp_path):
    config = load_config(None, {"pretrain": None, "kitchen.bootstrap": 0})
    setup = prepare_cooking(config, tmp_path)
    pool = perturbed_pool(setup.recipe_inputs.base, tmp_path, seed=1)
    (learned,) = cook_and_score(setup, RecipeChoice(name="learned", options={"epochs": 1}), pool, tmp_path)
    assert learned.in_sample == [] and setup.fit_scored == ()
