"""One validated configuration at the edge, and command-line errors that say what to do in one line."""

from __future__ import annotations

import pytest
import torch

from cli.main import main
from soups.config import ConfigError, PipelineConfig, load_config
from soups.cooking import split_heldout
from soups.images import ImageTensors


def test_embedded_defaults_are_the_offline_paper_setup():
    config = load_config()
    assert config.model.pretrained is None and config.pretrain is not None, "offline: pretrain a start"
    assert config.space["lr"].low == 1e-6 and config.space["lr"].high == 1e-4, "the paper's sweep space"
    assert config.sweep.n_trials >= 8
    recipes = {"uniform", "greedy", "learned", "learned_by_layer", "ensemble", "wise_ft"}
    assert set(config.kitchen.recipe_names()) >= recipes
    assert config.kitchen.promotion_metric == "heldout"


def test_config_file_errors_name_the_field_and_the_allowed_values(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("sweep:\n  sampler: grid\nkitchen:\n  promotion_metric: shift_mean\nmodel:\n  nmae: x\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "sweep.sampler" in message and "'tpe', 'random' or 'qmc'" in message
    assert "kitchen.promotion_metric" in message and "'heldout' or 'ood_val_mean'" in message
    assert "model.nmae" in message
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("space:\n  learning_rate: {kind: uniform, low: 0, high: 1}\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(path)


def test_a_yaml_file_and_overrides_reach_the_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("experiment: mine\nsweep:\n  n_trials: 5\n")
    config = load_config(path, {"sweep.parallel": 2})
    assert isinstance(config, PipelineConfig)
    assert (config.experiment, config.sweep.n_trials, config.sweep.parallel) == ("mine", 5, 2)
    assert config.finetune_config({"lr": 1e-5}).train.lr == 1e-5


def test_cli_reports_a_bad_config_without_a_traceback(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("sweep:\n  n_trials: 0\n")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "sweep.n_trials" in err and "Traceback" not in err


def test_cli_says_to_pretrain_first_when_no_start_exists(tmp_path, capsys):
    assert main(["sweep", "--set", f"tracking.root={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert "soups pretrain" in err and "Traceback" not in err


def test_heldout_is_split_into_disjoint_fit_and_score_parts():
    data = ImageTensors(torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2), torch.arange(10))
    fit, score = split_heldout(data, 0.5, seed=0)
    assert len(fit) == len(score) == 5
    assert set(fit.labels.tolist()).isdisjoint(score.labels.tolist())
    assert sorted(fit.labels.tolist() + score.labels.tolist()) == list(range(10))
    again, _ = split_heldout(data, 0.5, seed=0)
    assert torch.equal(again.labels, fit.labels), "the split is seeded"


def test_recipe_options_are_checked_against_what_each_recipe_declares(tmp_path):
    config = load_config(None, {"kitchen.recipes": ["uniform", {"name": "greedy", "options": {"strict": True}}]})
    uniform, greedy = config.kitchen.recipes
    assert (uniform.name, uniform.options) == ("uniform", {"dtype": None}), "defaults are filled in"
    assert (greedy.name, greedy.options["strict"]) == ("greedy", True)
    with pytest.raises(ConfigError, match="unknown recipe 'soupe'; known recipes: best, uniform"):
        load_config(None, {"kitchen.recipes": ["soupe"]})
    with pytest.raises(ConfigError, match=r"option.*stps.*allowed options: epochs, lr, batch_size"):
        load_config(None, {"kitchen.recipes": [{"name": "learned", "options": {"stps": 10}}]})
    with pytest.raises(ConfigError, match=r"budget is in epochs.*replace steps: 500 with epochs"):
        load_config(None, {"kitchen.recipes": [{"name": "learned", "options": {"steps": 500}}]})
    with pytest.raises(ConfigError, match="listed more than once"):
        load_config(None, {"kitchen.recipes": ["uniform", "uniform"]})


def test_promoting_on_ood_validation_needs_ood_validation_sets():
    with pytest.raises(ConfigError, match="needs data.ood_val"):
        load_config(None, {"kitchen.promotion_metric": "ood_val_mean"})
    config = load_config(None, {"kitchen.promotion_metric": "ood_val_mean", "data.ood_val": ["rotate"]})
    assert config.data.ood_val == ["rotate"]
