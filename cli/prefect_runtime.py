"""The process around a flow run: where Prefect keeps its data, a temporary server that dies with the command,
and Prefect's console logs without tracebacks (they stay at debug level)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def prepare_environment(root: Path) -> None:
    """Keep Prefect's local database beside the MLflow and Optuna data (unless the user chose a home or a
    server), so the UIs printed at the end show this run; quiet MLflow's download progress bars."""
    if "PREFECT_HOME" not in os.environ:
        home = (root / "prefect").resolve()
        home.mkdir(parents=True, exist_ok=True)
        os.environ["PREFECT_HOME"] = str(home)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # A fresh Prefect home migrates its database on first start, which takes longer than the 20 s default.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    # The temporary server's telemetry writes race the flow for the SQLite lock ("database is locked").
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


# Arms the parent-death signal (PR_SET_PDEATHSIG = 1), checks the parent still lives, then becomes the command:
# a small exec trampoline, since a preexec_fn is unsafe once a process has threads.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
    "os.getppid() == int(sys.argv[1]) or sys.exit(1); os.execvp(sys.argv[2], sys.argv[2:])"
)


@contextmanager
def _children_die_with_us() -> Iterator[None]:
    """Processes started meanwhile get the kernel's parent-death signal (Linux; elsewhere nothing changes)."""
    if not sys.platform.startswith("linux"):
        yield
        return
    import subprocess

    popen = subprocess.Popen
    parent = str(os.getpid())

    def dying_with_us(args, *rest, **kwargs):
        return popen([sys.executable, "-c", _DIE_WITH_PARENT, parent, *args], *rest, **kwargs)

    subprocess.Popen = dying_with_us
    try:
        yield
    finally:
        subprocess.Popen = popen


def start_temporary_server(tracking) -> None:
    """Prefect's temporary server (when PREFECT_API_URL names none) is a uvicorn child process that outlives
    a SIGKILLed parent, and migrates its database on a fresh PREFECT_HOME. Start it here: with the
    parent-death signal set, so a killed `soups` leaves no server behind, and under the data root's lock, so
    commands started together never migrate the same fresh database at once. Prefect's client then reuses it
    (the one `SubprocessASGIServer` keyed by port None)."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    from tasks.adapters.tracking import stores_lock

    with stores_lock(tracking), _children_die_with_us():
        SubprocessASGIServer().start()


class _TracebackToDebug:
    """On the console, Prefect's error logs keep their message line; the traceback goes to debug level
    (PREFECT_LOGGING_LEVEL=DEBUG, or SOUPS_DEBUG=1, shows it). The Prefect UI keeps the full record."""

    def filter(self, record) -> bool:
        import logging

        if record.exc_info and record.levelno > logging.DEBUG:
            logging.getLogger("prefect.soups.traceback").debug(
                "traceback of: %s", record.getMessage(), exc_info=record.exc_info
            )
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_tracebacks() -> None:
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    if os.environ.get("SOUPS_DEBUG"):
        return
    import prefect.main  # noqa: F401 - configures Prefect's logging (its console handler) once

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not any(
            isinstance(f, _TracebackToDebug) for f in handler.filters
        ):
            handler.addFilter(_TracebackToDebug())
