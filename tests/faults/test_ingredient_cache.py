"""Kitchen runs share one verified copy of each ingredient per machine, found by its sha256."""

from __future__ import annotations

import torch

from soups.checkpoint import file_sha256, save_state_dict
from soups.config import load_config
from tasks.adapters.tracking import client_for, ensure_experiment, ingredients_model_name
from tasks.gathering import gather_ingredients


def test_kitchen_runs_reuse_one_checked_copy_per_digest_and_fetch_a_changed_one_again(tmp_path, capsys):
    config = load_config(None, {"tracking.root": str(tmp_path / "data"), "pretrain": None})
    experiment_id = ensure_experiment(config)
    client = client_for(config.tracking)
    for number in (1, 2):
        checkpoint = save_state_dict({"w": torch.full((4,), float(number))}, tmp_path / f"trial-{number}.safetensors")
        run_id = client.create_run(experiment_id).info.run_id
        client.log_artifact(run_id, str(checkpoint), "checkpoint")
        client.set_terminated(run_id, "FINISHED")
        tags = {"study": config.study_name, "sha256": file_sha256(checkpoint), "checkpoint": checkpoint.name}
        source = f"{client.get_run(run_id).info.artifact_uri}/checkpoint"
        client.create_model_version(ingredients_model_name(config), source=source, run_id=run_id, tags=tags)

    first = gather_ingredients.fn(config).refs
    second = gather_ingredients.fn(config).refs
    cache = config.tracking.resolved_cache_dir()
    assert [r.checkpoint for r in first] == [r.checkpoint for r in second]
    assert all(r.checkpoint.parent.parent == cache for r in first)
    assert sorted(p.name for p in cache.iterdir()) == sorted(file_sha256(r.checkpoint) for r in first)
    assert len(list(cache.rglob("*.safetensors"))) == 2  # one copy each, however many kitchen runs

    first[0].checkpoint.write_bytes(b"changed on disk")
    capsys.readouterr()
    third = gather_ingredients.fn(config).refs
    assert "no longer has sha256" in capsys.readouterr().out
    assert all(file_sha256(r.checkpoint) == r.checkpoint.parent.name for r in third)  # the registered content again
    assert [r.version for r in third] == ["1", "2"]
