"""The kitchen flow: gather registered ingredients, cook every configured recipe and baseline, evaluate in
and out of distribution, report, register the soups and promote the best.

A kitchen that fails goes on where it stopped the next time it runs with the same config, ingredients and
code (tasks/kitchen_runs.py): it reopens its MLflow run and work folder and cooks nothing twice."""

from __future__ import annotations

from prefect import flow

from soups.config import PipelineConfig
from soups.pretrain import with_resolved_start
from tasks.adapters.tracking import ensure_experiment
from tasks.cooking import cook_task, plan_kitchen, prepare_cooking_task, score_ingredients_task
from tasks.gathering import gather_ingredients, tag_ingredient_scores
from tasks.kitchen_runs import kitchen_run
from tasks.promotion import promote
from tasks.registration import log_candidate_runs, register_candidates
from tasks.reporting import log_kitchen_report


@flow(name="kitchen", flow_run_name="kitchen-{config.experiment}", log_prints=True)
def kitchen_flow(config: PipelineConfig, experiment_id: str | None = None) -> dict:
    """``experiment_id``: the experiment the command that starts this flow ensured (a deployed run ensures it)."""
    config = with_resolved_start(config, missing_ok=True)  # imported fine-tunes need no start (see cook loop)
    experiment_id = experiment_id or ensure_experiment(config)
    gathered = gather_ingredients(config)
    refs = gathered.refs
    with kitchen_run(config, experiment_id, {r.version: r.sha256 for r in refs}) as run:
        setup = prepare_cooking_task(run, gathered)
        candidates = score_ingredients_task(run, setup, refs)
        tag_ingredient_scores(run, refs, candidates)
        planned = plan_kitchen(run, setup, refs)
        scored = list(candidates)
        for choice in planned.entries:
            candidates += cook_task(run, setup, choice, refs, scored)
        board = log_kitchen_report(run, setup, candidates, gathered.skipped)
        registered = register_candidates(run, setup.spec, candidates, refs)
        log_candidate_runs(run, candidates)
        decision = promote(run, registered, setup)
    return {
        "run_id": run.run_id,
        "resumed": run.resumed,
        "leaderboard": board,
        "promotion": decision.model_dump(),
        "registered": [r.model_dump() for r in registered],
        "skipped_ingredients": gathered.skipped,
    }
