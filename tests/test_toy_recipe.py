"""Adding a recipe is one module plus one registry line: a toy recipe defined here, with options, typed
details, a figure, a default grid and a paper row, goes through the config, the kitchen's cooking and tuning,
its records, the figures, promotion, the registry tags and the reproduction report without any other file
knowing its name."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import Field

from soups.candidates import load_cooked, promotable, save_cooked
from soups.checkpoint import Ingredient
from soups.config import RecipeChoice, load_config
from soups.cooking import cook_and_score, prepare_cooking, score_ingredients
from soups.figures import canvas
from soups.recipes import RECIPES, Dish, Recipe, RecipeDetails, RecipeInputs, RecipeOptions
from soups.report import kitchen_figures, leaderboard
from soups.reproduction import paper_rows, reproduction_report
from soups.statedict import blend, load_ingredient
from tests.helpers import perturbed_pool


class ToyOptions(RecipeOptions):
    weight: float = Field(0.5, ge=0, le=1, description="Weight of the second-best ingredient.")


class ToyDetails(RecipeDetails):
    weight: float
    pair: list[str]

    def tags(self) -> dict[str, str]:
        return {"toy_weight": repr(self.weight)}


def toy(ingredients: list[Ingredient], inputs: RecipeInputs, options: ToyOptions) -> list[Dish]:
    first, second = sorted(ingredients, key=lambda i: i.score, reverse=True)[:2]
    state = blend(load_ingredient(first), load_ingredient(second), options.weight)
    details = ToyDetails(weight=options.weight, pair=[first.name, second.name])
    return [Dish("toy", "toy", [first, second], state_dict=state, details=details)]


def pair_figure(details: ToyDetails, ingredients: list[str]) -> dict[str, Any]:
    fig, ax = canvas(3, 2)
    ax.bar([0, 1], [1 - details.weight, details.weight])
    return {"pair": fig}


TOY = Recipe(
    "toy",
    toy,
    ToyOptions,
    "the two best ingredients, interpolated",
    details=ToyDetails,
    default_grid={"weight": [0.25, 0.75]},
    figures=pair_figure,
    min_ingredients=2,
    paper_row=11,
)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(RECIPES, "toy", TOY)  # the one registry line


@pytest.fixture(scope="module")
def kitchen(tmp_path_factory):
    config = load_config(None, {"pretrain": None, "kitchen.bootstrap": 0})
    work = tmp_path_factory.mktemp("toy-kitchen")
    setup = prepare_cooking(config, work)
    pool = perturbed_pool(setup.recipe_inputs.base, work, seed=1)
    return setup, pool


def test_a_toy_recipe_in_one_module_is_cooked_tuned_recorded_drawn_promoted_and_reported(registered, kitchen, tmp_path):
    setup, pool = kitchen
    choice = RecipeChoice.model_validate({"name": "toy", "grid": TOY.default_grid})
    assert choice.candidate_labels() == ["toy"]
    with pytest.raises(ValueError, match="allowed options: weight"):
        RecipeChoice.model_validate({"name": "toy", "options": {"wieght": 0.1}})

    (candidate,) = cook_and_score(setup, choice, pool, tmp_path / "soups")
    assert isinstance(candidate.details, ToyDetails) and candidate.details.pair == ["i2", "i1"]
    assert candidate.tuned in ({"weight": 0.25}, {"weight": 0.75}) and len(candidate.grid) == 2
    assert candidate.checkpoint.name == "toy.safetensors"

    record = tmp_path / "cooked" / "recipe-toy.json"
    save_cooked(record, [candidate])
    (again,) = load_cooked(record)
    assert again.details == candidate.details and again.tuned == candidate.tuned, "read back with its own type"

    candidates = [*score_ingredients(setup, pool), candidate]
    board = leaderboard(candidates)
    figures = kitchen_figures(candidates, board)
    assert {"toy_pair.png", "toy_grid.png"} <= set(figures), "its own figure and its grid, keyed by its label"
    assert candidate in promotable(candidates)
    assert candidate.tags() == {
        "toy_weight": repr(candidate.details.weight),
        "tuned": f'{{"weight": {candidate.tuned["weight"]}}}',
    }
    assert candidate.details_json()["pair"] == ["i2", "i1"]
    assert list(paper_rows(board).model) == ["toy"], "its paper row, from its declaration"
    report = reproduction_report(
        board, study="s", split_sizes={}, figures=list(figures), resamples=0, compare=lambda *_: None
    )
    assert "| toy |" in report and "toy_pair.png" in report
