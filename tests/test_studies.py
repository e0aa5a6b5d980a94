"""Optuna studies from the config: storages, samplers, the paper's space, resuming, pruning settings."""

from __future__ import annotations

import optuna
import pytest

from soups.config import TrainConfig, load_config
from tasks.adapters.studies import open_study, open_trial, sample_params, still_running


@pytest.mark.parametrize("sampler", ["tpe", "random", "qmc"])
def test_every_sampler_draws_valid_training_settings_from_the_papers_space(tmp_path, sampler):
    config = load_config(None, {"tracking.root": str(tmp_path), "sweep.sampler": sampler})
    study = open_study(config)
    for _ in range(4):
        trial = study.ask()
        params = sample_params(trial, config.space)
        train = TrainConfig.model_validate({**config.train.model_dump(), **params})
        assert 1e-6 <= train.lr <= 1e-4 and 4 <= train.epochs <= 16 and 0 <= train.randaugment_n <= 2
        assert train.label_smoothing == 0 or trial.params["label_smoothing_on"]
        study.tell(trial, 0.5)


def test_journal_storage_resumes_with_new_points(tmp_path):
    settings = {
        "tracking.root": str(tmp_path),
        "tracking.optuna_storage": f"journal:{tmp_path / 'journal.log'}",
        "sweep.sampler": "random",
    }
    config = load_config(None, settings)
    first = open_study(config)
    earlier = []
    for _ in range(3):
        trial = first.ask()
        earlier.append(sample_params(trial, config.space))
        first.tell(trial, 0.1)
    resumed = open_study(config)
    trial = resumed.ask()
    assert trial.number == 3, "trial numbering continues in a resumed study"
    assert sample_params(trial, config.space) not in earlier
    assert (tmp_path / "journal.log").is_file()


def test_a_trial_reopened_from_ids_uses_the_configured_pruner_and_sees_its_end(tmp_path):
    config = load_config(None, {"tracking.root": str(tmp_path), "sweep.pruning": True})
    study = open_study(config)
    trial = study.ask()
    reopened = open_trial(config.tracking.resolved_optuna_storage(), config.study_name, trial._trial_id, True)
    assert isinstance(reopened.study.pruner, optuna.pruners.MedianPruner)
    assert still_running(reopened)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    assert not still_running(reopened), "after the sweep ends a trial, the task must not register it"
