"""Greedy soup with a scripted evaluate callback: selections, ties under both rules, trajectory, call count."""

from __future__ import annotations

import pytest
import torch

from soups.checkpoint import Ingredient, save_state_dict
from soups.recipes import RecipeInputs, cook
from soups.recipes.greedy import greedy_soup


def _constant_models(folder, values: dict[str, float], scores: dict[str, float | None]) -> list[Ingredient]:
    """Ingredient 'name' has every weight equal to values[name], so a soup's weight reveals its members."""
    out = []
    for name, value in values.items():
        sd = {"w": torch.full((4,), value), "b": torch.full((2,), value).half()}
        out.append(Ingredient(save_state_dict(sd, folder / f"{name}.safetensors"), scores[name], name))
    return out


class ScriptedEvaluate:
    """Scores a candidate by the value of its weights, from a table; counts calls."""

    def __init__(self, table: dict[float, float]) -> None:
        self.table = table
        self.calls: list[float] = []

    def __call__(self, state_dict) -> float:
        value = round(float(state_dict["w"][0]), 4)
        self.calls.append(value)
        return self.table[value]


def test_known_selection_and_trajectory(tmp_path):
    # a=1 (best), b=3, c=5, d=-1. Soups: {a,b}=2 -> 0.92 (up, keep); {a,b,c}=3 -> 0.80 (down, drop);
    # {a,b,d}=1 -> 0.95 (up, keep).
    ingredients = _constant_models(
        tmp_path, {"d": -1.0, "c": 5.0, "a": 1.0, "b": 3.0}, {"a": 0.9, "b": 0.85, "c": 0.8, "d": 0.7}
    )
    evaluate = ScriptedEvaluate({2.0: 0.92, 3.0: 0.80, 1.0: 0.95})
    result = greedy_soup(ingredients, evaluate)
    assert [i.name for i in result.accepted] == ["a", "b", "d"]
    assert result.evaluations == len(ingredients) - 1 == len(evaluate.calls)
    assert evaluate.calls == [2.0, 3.0, 1.0]
    assert torch.allclose(result.state_dict["w"], torch.full((4,), 1.0))
    assert result.state_dict["b"].dtype == torch.float16, "the soup keeps the ingredients' dtypes"
    assert result.score == pytest.approx(0.95)
    steps = [(s.ingredient, s.candidate_score, s.accepted, s.soup_size) for s in result.trajectory]
    assert steps == [("a", 0.9, True, 1), ("b", 0.92, True, 2), ("c", 0.80, False, 2), ("d", 0.95, True, 3)]


def test_ties_follow_the_chosen_rule(tmp_path):
    ingredients = _constant_models(tmp_path, {"a": 0.0, "b": 2.0}, {"a": 0.9, "b": 0.8})
    table = {1.0: 0.9}  # the soup of a and b scores exactly as well as a alone
    paper = greedy_soup(ingredients, ScriptedEvaluate(table))
    official = greedy_soup(ingredients, ScriptedEvaluate(table), strict=True)
    assert [i.name for i in paper.accepted] == ["a", "b"], "paper's rule keeps an ingredient on a tie"
    assert [i.name for i in official.accepted] == ["a"], "official code's strict rule drops it"
    assert torch.allclose(official.state_dict["w"], torch.zeros(4))


def test_unscored_ingredients_are_scored_first(tmp_path):
    ingredients = _constant_models(tmp_path, {"a": 0.0, "b": 2.0, "c": 4.0}, {"a": None, "b": None, "c": None})
    evaluate = ScriptedEvaluate({0.0: 0.5, 2.0: 0.7, 4.0: 0.6, 3.0: 0.75, 2.6667: 0.70})
    result = greedy_soup(ingredients, evaluate)
    assert result.evaluations == 3 + 2
    assert [i.name for i in result.accepted] == ["b", "c"]
    assert result.trajectory[0].ingredient == "b"


def test_greedy_recipe_through_the_registry(tmp_path):
    ingredients = _constant_models(tmp_path, {"a": 1.0, "b": 3.0}, {"a": 0.9, "b": 0.85})
    with pytest.raises(ValueError, match="needs inputs.evaluate"):
        cook("greedy", ingredients)
    (dish,) = cook("greedy", ingredients, RecipeInputs(evaluate=ScriptedEvaluate({2.0: 0.91})))
    assert dish.recipe == "greedy" and len(dish.ingredients) == 2
    assert dish.details.evaluations == 1 and len(dish.details.trajectory) == 2
