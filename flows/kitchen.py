"""The soup kitchen flow: gather registered ingredients, cook every configured recipe and baseline,
evaluate in and out of distribution, report, register the soups and promote the best."""

from __future__ import annotations

from prefect import flow

from soups.config import PipelineConfig
from tasks.kitchen import (
    cook_task,
    gather_ingredients,
    log_kitchen_report,
    register_candidates,
    score_ingredients_task,
)
from tasks.pretraining import resolve_pretrained
from tasks.promotion import promote
from tasks.tracking import client_for, ensure_experiment, tracked_run


@flow(name="kitchen", log_prints=True)
def kitchen_flow(config: PipelineConfig, pretrained: str | None = None) -> dict:
    pretrained = pretrained or resolve_pretrained(config)
    experiment_id = ensure_experiment(config)
    client = client_for(config.tracking)
    tags = {"kind": "kitchen", "study": config.study_name}
    with tracked_run(client, experiment_id, f"kitchen-{config.study_name}", tags) as run_id:
        workdir = (config.tracking.root / "kitchen" / run_id).resolve()
        refs = gather_ingredients(config, workdir / "ingredients")
        client.log_param(run_id, "ingredient_versions", ",".join(r.version for r in refs))
        candidates = score_ingredients_task(config, refs, pretrained, workdir)
        heldout_scores = {c.name: c.scores["heldout"] for c in candidates}
        for recipe in config.kitchen.recipes:
            candidates += cook_task(config, recipe, refs, heldout_scores, pretrained, workdir)
        board = log_kitchen_report(config, run_id, candidates, workdir)
        registered = register_candidates(config, experiment_id, run_id, candidates, refs, pretrained, workdir)
        decision = promote(config, run_id, registered, pretrained, workdir)
    return {
        "run_id": run_id,
        "leaderboard": board,
        "promotion": decision.model_dump(),
        "registered": [r.model_dump() for r in registered],
    }
