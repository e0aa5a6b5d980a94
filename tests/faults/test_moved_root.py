"""A data root copied or moved elsewhere works in its new place, and never reads from or writes into the old one.

MLflow stores absolute artifact locations (``file:///<root>/artifacts/...``); opening a root elsewhere
(`ensure_experiment`) rewrites them to the new place once (`tasks.adapters.relocation`). Real MLflow on sqlite in
tmp_path, two imported ingredients (tiny random-weight classifiers), no Prefect.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch

from soups.config import PipelineConfig, TrackingConfig, load_config
from tasks.adapters.relocation import MARKER, recorded_root, relocate_root

TINY = "soups-vit-tiny"


@pytest.fixture(autouse=True)
def _quiet_and_local(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.chdir(tmp_path)  # MLflow's default experiment names a folder under the working directory


def _config(root: Path) -> PipelineConfig:
    return load_config(None, {"experiment": "moved", "model.name": TINY, "tracking.root": str(root)})


def _checkpoint(folder: Path, seed: int) -> Path:
    from safetensors.torch import save_file

    from soups.models import create_clip, model_embed_dim

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_clip(TINY)[0].eval()
    g = torch.Generator().manual_seed(seed)
    tensors = {f"visual.{k}": v for k, v in model.visual.state_dict().items()}
    tensors |= {"head.weight": torch.randn(4, model_embed_dim(TINY), generator=g), "head.bias": torch.randn(4)}
    path = folder / f"fine-tune-{seed}.safetensors"
    save_file(tensors, str(path))
    return path


def _made_root(tmp_path: Path) -> Path:
    """A data root holding two registered ingredients, made by `soups import`'s function."""
    from tasks.importing import import_checkpoints

    root = tmp_path / "original" / "soups-data"
    sources = tmp_path / "sources"
    sources.mkdir()
    assert import_checkpoints(_config(root), [_checkpoint(sources, seed) for seed in (1, 2)]) == ["1", "2"]
    assert recorded_root(root) == root.resolve()
    return root.resolve()


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _cells_naming(database: Path, folder: Path) -> list[str]:
    """Every table.column of the database with a value that names ``folder`` (as a path or a file URI)."""
    found = []
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for column in [row[1] for row in connection.execute(f'PRAGMA table_info("{table}")')]:
                for needle in (str(folder), folder.as_uri()):
                    sql = f'SELECT count(*) FROM "{table}" WHERE instr(CAST("{column}" AS TEXT), ?) > 0'
                    if connection.execute(sql, (needle,)).fetchone()[0]:
                        found.append(f"{table}.{column}")
    return found


def _use(config: PipelineConfig, scratch: Path) -> None:
    """What a stage does with the root: open it, gather the ingredients (downloaded from the artifact store and
    checked against their sha256 tags), and log a new run's artifact; all of it inside the root."""
    from soups.checkpoint import file_sha256
    from tasks.adapters.tracking import (
        client_for,
        ensure_experiment,
        ingredients_model_name,
        tracked_run,
    )
    from tasks.gathering import gather_ingredients

    root = config.tracking.root.resolve()
    experiment_id = ensure_experiment(config)
    client = client_for(config.tracking)
    assert client.get_experiment(experiment_id).artifact_location == (root / "artifacts").as_uri()
    versions = {str(v.version): v for v in client.search_model_versions(f"name='{ingredients_model_name(config)}'")}
    for version in versions.values():
        for location in (version.source, client.get_run(version.run_id).info.artifact_uri):
            assert location.startswith(root.as_uri() + "/artifacts/"), location

    refs = gather_ingredients.fn(config).refs

    assert [ref.version for ref in refs] == ["1", "2"]
    for ref in refs:
        assert ref.checkpoint.resolve().is_relative_to(root)
        assert file_sha256(ref.checkpoint) == versions[ref.version].tags["sha256"]
    note = scratch / "note.txt"
    note.write_text("logged after the root moved")
    with tracked_run(client, experiment_id, "after-the-move", {"kind": "test"}) as run_id:
        client.log_artifact(run_id, str(note), "notes")
    assert client.get_run(run_id).info.artifact_uri == (root / "artifacts" / run_id / "artifacts").as_uri()
    assert (root / "artifacts" / run_id / "artifacts" / "notes" / "note.txt").read_text() == note.read_text()


@pytest.mark.parametrize("marked", [True, False], ids=["marked", "made-before-the-marker"])
def test_a_copied_root_works_in_its_new_place_and_leaves_the_original_untouched(tmp_path, capsys, marked):
    from tasks.adapters.tracking import ensure_experiment

    original = _made_root(tmp_path)
    if not marked:
        (original / MARKER).unlink()  # as an older version left it
    before = _digests(original)
    copy = tmp_path / "elsewhere" / "copy of soups-data"  # a space: stored URIs percent-encode it
    shutil.copytree(original, copy)
    capsys.readouterr()

    _use(_config(copy), tmp_path)

    out = capsys.readouterr().out
    assert f"data root relocated from {original} to {copy}: " in out
    assert "runs.artifact_uri 2, model_versions.source 2, model_versions.storage_location 2" in out
    assert _digests(original) == before
    assert recorded_root(copy) == copy
    assert _cells_naming(copy / "mlflow.db", original) == []
    ensure_experiment(_config(copy))  # opened again: nothing left to relocate
    assert "relocated" not in capsys.readouterr().out


def test_a_moved_root_works_where_it_went_and_never_recreates_the_old_folder(tmp_path, capsys):
    original = _made_root(tmp_path)
    moved = tmp_path / "moved" / "soups-data"
    moved.parent.mkdir()
    shutil.move(original, moved)

    _use(_config(moved), tmp_path)

    assert f"data root relocated from {original} to {moved}: " in capsys.readouterr().out
    assert not original.exists()
    assert _cells_naming(moved / "mlflow.db", original) == []


def test_a_root_moved_into_its_old_folder_is_relocated_once_even_if_its_marker_was_not_updated(tmp_path):
    """A crash between the database's commit and the marker's update relocates again: no location moves twice,
    also when the new root lies inside the old one (its prefix starts with the old prefix)."""
    old = tmp_path / "data"
    root = old / "inner"
    root.mkdir(parents=True)
    with sqlite3.connect(root / "mlflow.db") as connection:
        connection.execute("CREATE TABLE experiments (experiment_id INTEGER, artifact_location TEXT)")
        connection.execute("CREATE TABLE runs (run_uuid TEXT, artifact_uri TEXT)")
        connection.execute("INSERT INTO experiments VALUES (1, ?)", ((old / "artifacts").as_uri(),))
        connection.execute("INSERT INTO runs VALUES ('a', ?)", (f"{(old / 'artifacts').as_uri()}/a/artifacts",))
        connection.execute("INSERT INTO runs VALUES ('b', ?)", (f"{old}/artifacts/b/artifacts",))
    tracking = TrackingConfig(root=root)
    for _ in range(2):
        (root / MARKER).write_text(f'{{"root": "{old}"}}')
        relocate_root(tracking)
        with sqlite3.connect(root / "mlflow.db") as connection:
            stored = [row[0] for row in connection.execute("SELECT artifact_uri FROM runs ORDER BY run_uuid")]
        assert stored == [f"{(root / 'artifacts').as_uri()}/a/artifacts", f"{root}/artifacts/b/artifacts"]
        assert recorded_root(root) == root


def test_only_the_roots_own_sqlite_store_is_relocated(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / MARKER).write_text('{"root": "/somewhere/else"}')
    for uri in ("http://127.0.0.1:5000", f"sqlite:///{tmp_path / 'shared.db'}"):
        assert relocate_root(TrackingConfig(root=root, mlflow_uri=uri)) is None
    assert recorded_root(root) == Path("/somewhere/else")
