"""A local data root that was moved or copied keeps working in its new place, and never touches the old one.

MLflow keeps absolute artifact locations (``file:///<root>/artifacts/...``) in its database, so a copied root
would read from, and log into, the original. The root therefore records where it lives (``MARKER``: JSON
``{"root": "<absolute path>"}``), and when it is opened (`tasks.adapters.tracking.ensure_experiment`, under the
root's `stores_lock`) somewhere else, every stored location under the old folder is rewritten to the new one,
in one SQLite transaction, before anything reads or writes an artifact; then the marker names the new folder.

Only the root's own store is relocated: the default ``sqlite:///<root>/mlflow.db`` whose experiments keep their
artifacts in ``<root>/artifacts``. An MLflow server (or another database) is left as it is.

What is rewritten (``LOCATIONS``) is what MLflow reads back to find files. Params, tags and dataset sources
keep what was logged (a record of what ran, never read to find a file here), and so do MLmodel files (their
artifacts' ``uri`` is where they were logged from; loading reads the model folder's own copy). Optuna's
database keeps no paths (trial user attrs are run ids, versions, seeds and reasons); Prefect's database under
``<root>/prefect`` is a history log and stays as it is.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

from soups.config import TrackingConfig

MARKER = ".soups-root.json"
"""In the data root: ``{"root": "<the absolute folder it was last opened at>"}``."""

LOCATIONS: tuple[tuple[str, str, str | None], ...] = (
    ("experiments", "artifact_location", None),
    ("runs", "artifact_uri", None),
    ("model_versions", "source", None),
    ("model_versions", "storage_location", None),
    ("logged_models", "artifact_location", None),
    ("trace_tags", "value", "mlflow.artifactLocation"),
)
"""(table, column, tag key) of every artifact location MLflow stores and reads back; a table or column this
MLflow's schema lacks is skipped."""


def own_database(tracking: TrackingConfig) -> Path | None:
    """``<root>/mlflow.db`` when MLflow's store is the root's own SQLite database, else None."""
    uri = tracking.resolved_mlflow_uri()
    if not uri.startswith("sqlite:///"):
        return None
    database = tracking.root.resolve() / "mlflow.db"
    named = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
    return database if named.resolve() == database else None


def recorded_root(root: Path) -> Path | None:
    """Where the root's marker says it lives (None: no marker, or one that cannot be read)."""
    try:
        return Path(json.loads((root / MARKER).read_text())["root"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_marker(root: Path) -> None:
    temporary = root / f"{MARKER}.{os.getpid()}.tmp"
    temporary.write_text(json.dumps({"root": str(root)}) + "\n")
    os.replace(temporary, root / MARKER)


def relocate_root(tracking: TrackingConfig) -> str | None:
    """Make the root's own MLflow database point at this root; returns (and prints) what was relocated, in one
    line, or None when nothing was. Call it under `stores_lock`. A root without marker (made before there was
    one) gets one; its stored locations are relocated from the folders they name when those hold the same
    layout as this root (``<old>/artifacts``, which this root has, or which is gone)."""
    database = own_database(tracking)
    if database is None:
        return None
    root = database.parent
    recorded = recorded_root(root)
    if recorded == root:
        return None
    if not database.is_file():  # a fresh root: MLflow creates its database next, here
        write_marker(root)
        return None
    connection = sqlite3.connect(database, timeout=600, isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
        try:
            old_roots = [recorded] if recorded is not None else _inferred_old_roots(connection, root)
            counts = _rewrite(connection, old_roots, root)
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")
    finally:
        connection.close()
    write_marker(root)
    if not old_roots:
        return None
    moved = {where: n for where, n in counts.items() if n}
    detail = ", ".join(f"{where} {n}" for where, n in moved.items()) or "none stored"
    message = (
        f"data root relocated from {', '.join(map(str, old_roots))} to {root}: "
        f"{sum(moved.values())} stored artifact locations rewritten ({detail})"
    )
    print(message)
    return message


def _columns(connection: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in connection.execute(f'PRAGMA table_info("{table}")')}


def _local_path(location: str | None) -> Path | None:
    if not location:
        return None
    if location.startswith("file:"):
        parts = urlsplit(location)
        if parts.netloc not in ("", "localhost"):
            return None
        return Path(url2pathname(parts.path))
    return Path(location) if location.startswith("/") else None


def _inferred_old_roots(connection: sqlite3.Connection, root: Path) -> list[Path]:
    """The folders a marker-less root's experiments keep their artifacts under, other than ``root``: those of
    the data root's layout (``<old>/artifacts`` or ``<old>/artifacts/<name>``) whose folder this root has too,
    or which no longer exists there."""
    if "artifact_location" not in _columns(connection, "experiments"):
        return []
    found: list[Path] = []
    for (location,) in connection.execute("SELECT artifact_location FROM experiments"):
        path = _local_path(location)
        if path is None:
            continue
        if path.name == "artifacts":
            old, layout = path.parent, Path("artifacts")
        elif path.parent.name == "artifacts":
            old, layout = path.parent.parent, Path("artifacts", path.name)
        else:
            continue
        if old == root or old in found:
            continue
        if (root / layout).is_dir() or not (old / layout).exists():
            found.append(old)
    return found


def _rewrite(connection: sqlite3.Connection, old_roots: list[Path], root: Path) -> dict[str, int]:
    """Every stored location under an old root, as a ``file://`` URI or a plain path, moved under ``root``."""
    counts: dict[str, int] = {}
    for table, column, key in LOCATIONS:
        columns = _columns(connection, table)
        if column not in columns or (key is not None and "key" not in columns):
            continue
        where = f"{table}.{column}"
        for old in old_roots:
            for before, after in ((old.as_uri() + "/", root.as_uri() + "/"), (f"{old}/", f"{root}/")):
                sql = f'UPDATE "{table}" SET "{column}" = ? || substr("{column}", ?) WHERE substr("{column}", 1, ?) = ?'
                args: list[object] = [after, len(before) + 1, len(before), before]
                if after.startswith(before):  # the new root inside the old one: never move a location twice
                    sql += f' AND substr("{column}", 1, ?) != ?'
                    args += [len(after), after]
                if key is not None:
                    sql += " AND key = ?"
                    args.append(key)
                counts[where] = counts.get(where, 0) + connection.execute(sql, args).rowcount
    return counts
