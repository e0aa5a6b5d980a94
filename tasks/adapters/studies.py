"""Optuna studies in persistent storage, opened from plain ids so any process can reach a trial."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.trial import FrozenTrial, TrialState

from soups.config import Distribution, PipelineConfig
from tasks.adapters.liveness import described, is_gone, this_process
from tasks.adapters.server_storage import ServerStorage

# The sweep asks and tells with heartbeats on purpose (it beats itself: see TrialHeartbeats).
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


class StudyStorageError(RuntimeError):
    """The Optuna storage cannot be opened; the message says why and what to do, in one line."""


def grace_seconds(heartbeat_seconds: int) -> int:
    """How long a running trial may go without a heartbeat before the next sweep fails it."""
    return 2 * heartbeat_seconds


def storage_for(
    url: str,
    heartbeat_seconds: int | None = None,
    on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None,
) -> optuna.storages.BaseStorage:
    """'journal:<path>' -> a journal file (several processes on one host); anything else is an RDB URL, with
    trial heartbeats every ``heartbeat_seconds`` when given (``on_stale`` is told of each trial failed for
    want of one)."""
    if url.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    from tasks.adapters.tracking import DRIVER_PACKAGES, shown_uri, with_installed_driver

    url = with_installed_driver(url)
    heartbeat = {}
    if heartbeat_seconds is not None:
        heartbeat = {
            "heartbeat_interval": heartbeat_seconds,
            "grace_period": grace_seconds(heartbeat_seconds),
            "heartbeat_stale_trial_callback": on_stale,
        }
    try:
        with experimental_ok():
            if url.startswith("sqlite"):
                return optuna.storages.RDBStorage(url, **heartbeat)
            return ServerStorage(url, **heartbeat)  # rides over a restart of the database server
    except ImportError as err:
        missing = getattr(err.__cause__, "name", None) or err.name or str(err)
        raise StudyStorageError(
            f"the Optuna storage {shown_uri(url)} needs the {missing} database driver, which is not installed: "
            f"install {DRIVER_PACKAGES.get(missing, missing)}, or use sqlite:///<file> or journal:<file>"
        ) from None
    except sqlalchemy.exc.OperationalError as err:
        first = " ".join(str(err.orig or err).split())[:300]
        raise StudyStorageError(
            f"cannot open the Optuna storage {shown_uri(url)}: {first}; start that database or fix "
            "tracking.optuna_storage"
        ) from None


def make_sampler(config: PipelineConfig, finished_before: int = 0) -> optuna.samplers.BaseSampler:
    """Seeded by the sweep seed and the study's size, so a resumed study draws new points instead of
    replaying the first session's (a sampler's random state is not stored with the study)."""
    seed = config.sweep.seed + 10_007 * finished_before
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "qmc": lambda: optuna.samplers.QMCSampler(seed=seed),
    }
    with experimental_ok():  # QMCSampler is experimental since Optuna 3.0
        return samplers[config.sweep.sampler]()


@contextmanager
def experimental_ok() -> Iterator[None]:
    """Optuna's ExperimentalWarning, and only it, silenced around the experimental APIs used on purpose."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def make_pruner(pruning: bool) -> optuna.pruners.BasePruner:
    """Median pruning after the first epoch when asked for; the same pruner wherever the study is opened."""
    return optuna.pruners.MedianPruner(n_warmup_steps=1) if pruning else optuna.pruners.NopPruner()


def open_study(config: PipelineConfig) -> optuna.Study:
    """Create the study, or resume it (trial numbers continue) when it already exists. Its storage records
    trial heartbeats (RDB URLs). Storage and study are created under the data root's lock, so sweeps started
    together on a fresh root never race to create the tables."""
    from tasks.adapters.tracking import stores_lock

    config.tracking.root.mkdir(parents=True, exist_ok=True)
    with stores_lock(config.tracking):
        study = optuna.create_study(
            study_name=config.study_name,
            storage=storage_for(config.tracking.resolved_optuna_storage(), config.sweep.heartbeat_seconds),
            sampler=make_sampler(config),
            pruner=make_pruner(config.sweep.pruning),
            direction="maximize",
            load_if_exists=True,
        )
    with experimental_ok():
        study.set_metric_names(["heldout_accuracy"])  # the objective, named in the Optuna dashboard (maximised)
    if study.trials:
        study.sampler = make_sampler(config, len(study.trials))
    return study


def open_trial(
    storage: str, study_name: str, trial_id: int, pruning: bool, heartbeat_seconds: int | None = None
) -> optuna.Trial:
    """A running trial reopened from plain ids (what a trial on another machine has); with ``heartbeat_seconds``
    its study's storage records heartbeats (see `TrialHeartbeats`)."""
    study = optuna.load_study(
        study_name=study_name, storage=storage_for(storage, heartbeat_seconds), pruner=make_pruner(pruning)
    )
    return optuna.Trial(study, trial_id)


def still_running(trial: optuna.Trial) -> bool:
    """False once the sweep has told the trial's end (e.g. it was interrupted): then nothing may be registered."""
    return trial.study._storage.get_trial(trial._trial_id).state == optuna.trial.TrialState.RUNNING


def _heartbeat_interval(study: optuna.Study) -> int | None:
    """The storage's heartbeat interval; None when it records no heartbeats (journal files, plain URLs)."""
    interval = getattr(study._storage, "get_heartbeat_interval", None)
    return interval() if interval else None


class TrialHeartbeats:
    """One daemon thread that records a heartbeat for every trial this process is running, every interval of
    the study's storage, so the next sweep can tell a trial whose process died from one still training.

    Optuna beats only inside ``study.optimize``; the sweep asks and tells, so it beats here. A trial's first
    heartbeat is written when it is added (a trial without any heartbeat is never found stale), with the name of
    this process (user attr ``process``), so a sweep on this host can tell at once when it is gone."""

    def __init__(self, study: optuna.Study) -> None:
        self._storage = study._storage
        self._interval = _heartbeat_interval(study)
        self._trial_ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> TrialHeartbeats:
        if self._interval:
            self._thread = threading.Thread(target=self._beat, name="trial-heartbeats", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def add(self, trial: optuna.Trial) -> None:
        self._storage.set_trial_user_attr(trial._trial_id, "process", this_process())
        if self._interval:
            self._storage.record_heartbeat(trial._trial_id)
            with self._lock:
                self._trial_ids.add(trial._trial_id)

    def remove(self, trial: optuna.Trial) -> None:
        with self._lock:
            self._trial_ids.discard(trial._trial_id)

    def _beat(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                trial_ids = sorted(self._trial_ids)
            for trial_id in trial_ids:
                try:
                    self._storage.record_heartbeat(trial_id)
                except Exception as err:  # noqa: BLE001 - a missed beat (e.g. a locked database) is retried
                    print(f"heartbeat of trial id {trial_id} not recorded, retrying: {type(err).__name__}: {err}")


def fail_stale_trials(study: optuna.Study) -> dict[int, str]:
    """Fail the running trials whose process died: on this host, those whose process is gone (at once); on any
    host, those with no heartbeat for the grace period. Like ``optuna.storages.fail_stale_trials``, but each gets
    a ``fail_reason`` user attr first (a finished trial's attrs cannot change). Returns trial number -> reason for
    the trials failed here; trials failed meanwhile by another sweep are left to it."""
    storage = study._storage
    reasons: dict[int, str] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        process = trial.user_attrs.get("process")
        if isinstance(process, dict) and is_gone(process):
            reasons[trial._trial_id] = f"process died: trial {trial.number}'s {described(process)} is gone"
    interval = _heartbeat_interval(study)
    if interval:
        for trial_id in storage._get_stale_trial_ids(study._study_id):
            number = storage.get_trial_number_from_id(trial_id)
            reason = f"process died: trial {number} had no heartbeat for more than {grace_seconds(interval)}s"
            reasons.setdefault(trial_id, reason)
    failed: dict[int, str] = {}
    for trial_id, reason in reasons.items():
        try:
            storage.set_trial_user_attr(trial_id, "fail_reason", reason)
            if storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                failed[storage.get_trial_number_from_id(trial_id)] = reason
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return failed


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
