"""An Optuna storage on a database server (PostgreSQL, MySQL) that rides over a restart of that server under a
running sweep (`pg_ctl restart` of the stack's cluster): checked pooled connections, new connections that wait
for the server, and calls made again when their connection dropped and that cannot do anything twice."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import optuna
import sqlalchemy
import sqlalchemy.exc

RECONNECT_SECONDS = 120.0
"""How long a storage whose database answered before waits for it to take connections again (a restart)."""
RETRIES = 3
"""How many times a storage call is made when its connection drops under it (each time waiting for the
database to take connections again)."""


def _reconnecting(engine: sqlalchemy.engine.Engine, seconds: float = RECONNECT_SECONDS) -> None:
    """New connections of ``engine`` (the first after a restart, when the pool's pre-ping finds the old ones
    dead) are retried for up to ``seconds`` while the database refuses them, with a printed line, instead of
    failing the storage call: nothing was sent yet, so any call may wait."""
    from sqlalchemy import event

    @event.listens_for(engine, "do_connect")
    def connect(dialect, record, cargs, cparams):
        started, refused = time.monotonic(), False
        while True:
            try:
                connection = dialect.connect(*cargs, **cparams)
            except dialect.loaded_dbapi.OperationalError as err:
                if time.monotonic() - started > seconds:
                    raise
                if not refused:
                    refused = True
                    why = " ".join(str(err).split())[:200]
                    print(f"the Optuna storage refused a connection ({why}); retrying for up to {seconds:.0f}s")
                time.sleep(0.5)
                continue
            if refused:
                print(f"the Optuna storage connected again after {time.monotonic() - started:.1f}s")
            return connection


def _dropped_connection(err: BaseException) -> sqlalchemy.exc.DBAPIError | None:
    """The disconnect behind a storage error (the database went away under the call), if that is what it was."""
    seen = err.__cause__
    while seen is not None:
        if isinstance(seen, sqlalchemy.exc.DBAPIError) and seen.connection_invalidated:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _may_call_again(err: optuna.exceptions.StorageInternalError, idempotent: bool) -> bool:
    """Whether a call that failed with ``err`` may be made again: its connection dropped, and either the call
    changes nothing when repeated (a read, an upsert) or it dropped before the COMMIT (while a statement ran,
    or inside the transaction it invalidated), so nothing was committed. A call whose COMMIT failed may have
    committed, and is only repeated when repeating it is harmless."""
    dropped = _dropped_connection(err)
    if dropped is None:
        return False
    uncommitted = dropped.statement is not None or isinstance(err.__cause__, sqlalchemy.exc.PendingRollbackError)
    return idempotent or uncommitted


def _called_again_when_dropped(method: Callable, idempotent: bool) -> Callable:
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        for attempt in range(1, RETRIES + 1):
            try:
                return method(self, *args, **kwargs)
            except optuna.exceptions.StorageInternalError as err:
                if attempt == RETRIES or not _may_call_again(err, idempotent):
                    raise
                why = " ".join(str(_dropped_connection(err).orig).split())[:200]
                print(f"the Optuna storage lost its connection in {method.__name__} ({why}); making the call again")

    return call


class ServerStorage(optuna.storages.RDBStorage):
    """An RDB storage on a database server (PostgreSQL, MySQL) that rides over a restart of that server under
    a running sweep: pooled connections are checked before use (``pool_pre_ping``; Optuna sets it for MySQL
    only), a new connection waits up to RECONNECT_SECONDS for the server to take it, and a call whose
    connection dropped is made again when that cannot do anything twice (`_may_call_again`). The waiting
    starts once the storage has connected: a wrong URL, or a database that never ran, still fails at once."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        engine_kwargs = {"pool_pre_ping": True, **(kwargs.pop("engine_kwargs", None) or {})}
        super().__init__(url, engine_kwargs=engine_kwargs, **kwargs)
        _reconnecting(self.engine)

    def __setstate__(self, state: dict[str, Any]) -> None:  # unpickled: a new engine
        super().__setstate__(state)
        _reconnecting(self.engine)


_IDEMPOTENT = (  # reads, and writes that leave the same rows when repeated
    "get_study_id_from_name",
    "get_study_name_from_id",
    "get_study_directions",
    "get_study_user_attrs",
    "get_study_system_attrs",
    "get_trial_user_attrs",
    "get_trial_system_attrs",
    "get_all_studies",
    "get_trial_param",
    "get_trial_id_from_study_id_trial_number",
    "get_trial",
    "_get_trials",
    "_get_best_trial_id",
    "_get_stale_trial_ids",
    "set_study_user_attr",
    "set_study_system_attr",
    "set_trial_user_attr",
    "set_trial_system_attr",
    "set_trial_intermediate_value",
    "record_heartbeat",
)
_ONCE = ("create_new_study", "delete_study", "_create_new_trial", "_set_trial_param", "set_trial_state_values")
for _name in _IDEMPOTENT + _ONCE:  # every RDBStorage method that opens a session (those _CachedStorage calls too)
    _method = getattr(optuna.storages.RDBStorage, _name)
    setattr(ServerStorage, _name, _called_again_when_dropped(_method, idempotent=_name in _IDEMPOTENT))
