"""A candidate's label stays as people read it; its stored name is accepted by every place that stores it,
checked with MLflow's and Prefect's own validators on every label the registered recipes can produce."""

from __future__ import annotations

import pytest
from mlflow.exceptions import MlflowException
from mlflow.utils import validation
from prefect.types import Name as PrefectName
from pydantic import TypeAdapter

from soups.config import ConfigError, RecipeChoice, load_config
from soups.names import MAX_LENGTH, stored_name
from soups.recipes import DEFAULT_KITCHEN, RECIPES

UNUSUAL_ALPHAS = [0.0, 1e-07, 0.05, 0.123, 0.124, 0.123456789, 1 / 3, 0.5, 0.999999, 1.0]
UNUSUAL_LABELS = [
    "greedy.v2",
    "ties_lambda-0.5",
    "v2",
    "V17",
    "latest",
    "x" * 300,
    "a" + "9.9" * 60,
    "wise.alt",
    "learned_lr-1e-05",
]


def _choices() -> list[RecipeChoice]:
    """The default kitchen, every recipe with its defaults, greedy over every recipe that cooks one soup, DARE
    both ways, WiSE-FT at awkward alphas, and hand-written labels of many shapes."""
    choices = [RecipeChoice.model_validate(entry) for entry in DEFAULT_KITCHEN]
    choices += [RecipeChoice(name=name) for name in RECIPES]
    combines = ["uniform", "ties", "task_arithmetic", "dare", "model_stock", "slerp", "learned", "best"]
    choices += [RecipeChoice(name="greedy", options={"combine": combine}) for combine in combines]
    choices += [RecipeChoice(name="dare", options={"combine": combine}) for combine in ("linear", "ties")]
    choices.append(RecipeChoice(name="wise_ft", options={"alphas": UNUSUAL_ALPHAS}))
    choices += [RecipeChoice(name="ties", label=label) for label in UNUSUAL_LABELS]
    choices.append(RecipeChoice(name="wise_ft", label="wise.alt", options={"alphas": UNUSUAL_ALPHAS}))
    return choices


def _labels() -> list[str]:
    labels = {label for choice in _choices() for label in choice.candidate_labels()}
    return sorted(labels | {"trial-0", "trial-71", "ingredient-v12"})  # the ingredients' own rows


def _accepted_by_every_store(name: str, tmp_path) -> None:
    validation._validate_logged_model_name(name)
    validation._validate_alias_name(name)
    validation._validate_alias_name_reserved(name)
    validation._validate_tag_name(name)
    validation._validate_param_name(name)
    validation._validate_model_name(name)
    TypeAdapter(PrefectName).validate_python(name)
    TypeAdapter(PrefectName).validate_python(f"cook-{name}")
    (tmp_path / name).mkdir()
    (tmp_path / f"{name}_grid.png").write_bytes(b"")
    (tmp_path / f"{name}.safetensors").write_bytes(b"")


def test_every_label_a_recipe_can_produce_gets_a_name_mlflow_prefect_and_files_accept(tmp_path):
    labels = _labels()
    assert len(labels) > 60
    for label in labels:
        name = stored_name(label)
        assert len(name) <= MAX_LENGTH, label
        _accepted_by_every_store(name, tmp_path)
    names = [stored_name(label) for label in labels]
    assert len(set(names)) == len(names), "two labels, two stored names"


def test_the_labels_themselves_fail_where_they_would_have_been_stored():
    """The bug this guards against: WiSE-FT's own labels are refused as MLflow logged-model names."""
    with pytest.raises(MlflowException, match="Invalid model name"):
        validation._validate_logged_model_name("wise_ft_0.60")
    assert stored_name("wise_ft_0.60") == "wise_ft_0p60"


def test_leaderboard_labels_are_unchanged_and_distinct_alphas_keep_distinct_labels():
    (wise,) = [c for c in map(RecipeChoice.model_validate, DEFAULT_KITCHEN) if c.name == "wise_ft"]
    assert wise.candidate_labels() == [f"wise_ft_{i / 10:.2f}" for i in range(1, 11)]
    awkward = RecipeChoice(name="wise_ft", options={"alphas": [0.123, 0.124, 0.5]}).candidate_labels()
    assert awkward == ["wise_ft_0.123", "wise_ft_0.124", "wise_ft_0.50"]
    greedy = [c.candidate_labels() for c in map(RecipeChoice.model_validate, DEFAULT_KITCHEN) if c.name == "greedy"]
    assert greedy == [["greedy"], ["greedy_ties"], ["greedy_task_arithmetic"]]


def test_a_label_whose_stored_name_another_candidate_has_is_a_config_error():
    recipes = ["wise_ft", {"name": "ties", "label": "wise_ft_0p60"}]
    with pytest.raises(ConfigError, match="'wise_ft_0.60' and 'wise_ft_0p60' would both be stored as 'wise_ft_0p60'"):
        load_config(None, {"kitchen.recipes": recipes})


def test_a_candidate_cooked_twice_is_a_config_error():
    recipes = [{"name": "wise_ft", "label": "w", "options": {"alphas": [0.5]}}, {"name": "ties", "label": "w"}]
    with pytest.raises(ConfigError, match="listed more than once"):
        load_config(None, {"kitchen.recipes": recipes})
    recipes = [{"name": "greedy", "options": {"combine": "ties"}}, {"name": "ties", "label": "greedy_ties"}]
    with pytest.raises(ConfigError, match=r"cook \['greedy_ties'\] more than once"):
        load_config(None, {"kitchen.recipes": recipes})
