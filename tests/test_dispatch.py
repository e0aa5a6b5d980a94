"""What a trial needs to run anywhere, checked without servers: the start by registry URI and digest (real
MLflow on sqlite), one trial per GPU (local slots and the stack's workers), and one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cli.main import main
from soups.config import load_config
from soups.runtime import trial_slots
from tasks.adapters.cache import ChecksumMismatchError, digest_of
from tasks.adapters.starts import fetched_start, publish_start
from tasks.adapters.tracking import client_for, ensure_experiment


@pytest.fixture
def config(tmp_path, pretrained_checkpoint):
    return load_config(None, {"tracking.root": str(tmp_path / "data"), "model.pretrained": str(pretrained_checkpoint)})


def test_a_published_start_is_fetched_once_per_machine_by_digest_and_verified(config, pretrained_checkpoint, tmp_path):
    client = client_for(config.tracking)
    portable = publish_start(config, client, ensure_experiment(config))
    assert portable.model.pretrained == "models:/digits-soups-base/1"
    assert publish_start(config, client, ensure_experiment(config)).model.pretrained == portable.model.pretrained

    # Another machine: its own cache folder; the copy lands under the digest and is checked.
    elsewhere = portable.model_copy(
        update={"tracking": portable.tracking.model_copy(update={"cache_dir": tmp_path / "other-machine"})}
    )
    local = fetched_start(elsewhere, client)
    digest = digest_of(pretrained_checkpoint)
    assert Path(local.model.pretrained) == tmp_path / "other-machine" / digest / pretrained_checkpoint.name
    assert Path(local.model.pretrained).read_bytes() == pretrained_checkpoint.read_bytes()
    assert local.model.model_dump(exclude={"pretrained"}) == config.model.model_dump(exclude={"pretrained"})

    # Cached: a second fetch downloads nothing (the artifact store could be gone).
    run_id = client.get_model_version("digits-soups-base", "1").run_id
    stored = next(Path(config.tracking.root, "artifacts").rglob(pretrained_checkpoint.name))
    stored.write_bytes(b"damaged")
    assert fetched_start(elsewhere, client).model.pretrained == local.model.pretrained
    assert Path(local.model.pretrained).read_bytes() == pretrained_checkpoint.read_bytes()

    # A cached copy that changed is not used: it is fetched again, and here the store's copy is damaged too.
    Path(local.model.pretrained).write_bytes(b"tampered")
    with pytest.raises(ChecksumMismatchError):
        fetched_start(elsewhere, client)

    # A damaged copy is refused on a machine without the cache, and leaves no partial copy behind.
    third = portable.model_copy(
        update={"tracking": portable.tracking.model_copy(update={"cache_dir": tmp_path / "third-machine"})}
    )
    with pytest.raises(ChecksumMismatchError, match=f"registered {digest}"):
        fetched_start(third, client)
    assert list((tmp_path / "third-machine").iterdir()) == []
    assert client.get_run(run_id).data.tags["sha256"] == digest


def test_a_start_folder_travels_as_a_folder(config, pretrained_checkpoint, tmp_path):
    folder = tmp_path / "start-folder"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}}))
    (folder / "open_clip_model.safetensors").write_bytes(pretrained_checkpoint.read_bytes())
    client = client_for(config.tracking)
    portable = publish_start(config.with_pretrained(f"local-dir:{folder}"), client, ensure_experiment(config))
    fetched = fetched_start(portable, client).model.pretrained
    assert fetched == f"local-dir:{config.tracking.resolved_cache_dir() / digest_of(folder) / 'start-folder'}"
    copy = Path(fetched.removeprefix("local-dir:"))
    assert sorted(p.name for p in copy.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]


def test_tags_and_random_init_are_left_for_each_machine_to_resolve(config):
    client = MlflowClient(tracking_uri=config.tracking.resolved_mlflow_uri())
    for start in ("laion2b_s34b_b79k", None):
        same = config.with_pretrained(start)
        assert publish_start(same, client, ensure_experiment(config)) == same
        assert fetched_start(same, client) == same


@pytest.mark.parametrize(
    ("device", "parallel", "gpus", "expected"),
    [
        ("auto", 4, 2, ["cuda:0", "cuda:1"]),  # one trial per GPU, never two on one
        ("cuda", 2, 4, ["cuda:0", "cuda:1"]),
        ("auto", 1, 1, ["cuda:0"]),
        ("auto", 3, 0, ["auto", "auto", "auto"]),  # CPU only: the configured parallelism
        ("cpu", 2, 2, ["cpu", "cpu"]),
        ("cuda:1", 2, 2, ["cuda:1", "cuda:1"]),  # an explicit device is the user's choice
    ],
)
def test_local_trials_get_a_gpu_each(device, parallel, gpus, expected):
    assert trial_slots(device, parallel, gpus) == expected


def test_a_deployment_sweep_without_a_prefect_server_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    code = main(["sweep", "--set", f"tracking.root={tmp_path}", "--set", "sweep.dispatch=deployment"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in error
    assert "PREFECT_API_URL" in error and "soups stack up" in error


def test_the_stack_refuses_more_workers_than_gpus_before_starting_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert main(["stack", "up", "--root", str(tmp_path / "stack"), "--workers", "3"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "--workers 3 is more than this machine's 2 GPUs" in error
    assert not (tmp_path / "stack" / "postgres").exists()
