"""Optuna studies in persistent storage, opened from plain ids so any process can reach a trial."""

from __future__ import annotations

from typing import Any

import optuna

from soups.config import Distribution, PipelineConfig


def storage_for(url: str) -> str | optuna.storages.BaseStorage:
    """'journal:<path>' -> a journal file (several processes on one host); anything else is an RDB URL."""
    if url.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    return url


def make_sampler(config: PipelineConfig) -> optuna.samplers.BaseSampler:
    seed = config.sweep.seed
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "qmc": lambda: optuna.samplers.QMCSampler(seed=seed),
    }
    return samplers[config.sweep.sampler]()


def open_study(config: PipelineConfig) -> optuna.Study:
    """Create the study, or resume it (trial numbers continue) when it already exists."""
    config.tracking.root.mkdir(parents=True, exist_ok=True)
    pruner = optuna.pruners.MedianPruner(n_warmup_steps=1) if config.sweep.pruning else optuna.pruners.NopPruner()
    return optuna.create_study(
        study_name=config.study_name,
        storage=storage_for(config.tracking.resolved_optuna_storage()),
        sampler=make_sampler(config),
        pruner=pruner,
        direction="maximize",
        load_if_exists=True,
    )


def open_trial(storage: str, study_name: str, trial_id: int) -> optuna.Trial:
    study = optuna.load_study(study_name=study_name, storage=storage_for(storage))
    return optuna.Trial(study, trial_id)


def sample_params(trial: optuna.Trial, space: dict[str, Distribution]) -> dict[str, Any]:
    """Draw one value per searched setting; ``or_zero`` settings first draw whether they are on at all."""
    params: dict[str, Any] = {}
    for name, dist in space.items():
        if dist.or_zero and not trial.suggest_categorical(f"{name}_on", [False, True]):
            params[name] = 0 if dist.kind == "int" else 0.0
        elif dist.kind == "categorical":
            params[name] = trial.suggest_categorical(name, dist.choices)
        elif dist.kind == "int":
            params[name] = trial.suggest_int(name, int(dist.low), int(dist.high))
        else:
            params[name] = trial.suggest_float(name, dist.low, dist.high, log=dist.kind == "loguniform")
    return params
