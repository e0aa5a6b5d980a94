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


def make_sampler(config: PipelineConfig, finished_before: int = 0) -> optuna.samplers.BaseSampler:
    """Seeded by the sweep seed and the study's size, so a resumed study draws new points instead of
    replaying the first session's (a sampler's random state is not stored with the study)."""
    seed = config.sweep.seed + 10_007 * finished_before
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "qmc": lambda: optuna.samplers.QMCSampler(seed=seed),
    }
    return samplers[config.sweep.sampler]()


def make_pruner(pruning: bool) -> optuna.pruners.BasePruner:
    """Median pruning after the first epoch when asked for; the same pruner wherever the study is opened."""
    return optuna.pruners.MedianPruner(n_warmup_steps=1) if pruning else optuna.pruners.NopPruner()


def open_study(config: PipelineConfig) -> optuna.Study:
    """Create the study, or resume it (trial numbers continue) when it already exists."""
    config.tracking.root.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name=config.study_name,
        storage=storage_for(config.tracking.resolved_optuna_storage()),
        sampler=make_sampler(config),
        pruner=make_pruner(config.sweep.pruning),
        direction="maximize",
        load_if_exists=True,
    )
    if study.trials:
        study.sampler = make_sampler(config, len(study.trials))
    return study


def open_trial(storage: str, study_name: str, trial_id: int, pruning: bool) -> optuna.Trial:
    """A running trial reopened from plain ids (what a trial task on another machine has)."""
    study = optuna.load_study(study_name=study_name, storage=storage_for(storage), pruner=make_pruner(pruning))
    return optuna.Trial(study, trial_id)


def still_running(trial: optuna.Trial) -> bool:
    """False once the sweep has told the trial's end (e.g. it was interrupted): then nothing may be registered."""
    return trial.study._storage.get_trial(trial._trial_id).state == optuna.trial.TrialState.RUNNING


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
