"""The kitchen flow: gather registered ingredients, cook every configured recipe and baseline, evaluate in
and out of distribution, report, register the soups and promote the best.

A kitchen that fails goes on where it stopped the next time it runs with the same config, ingredients and
code (tasks/kitchen_runs.py): it reopens its MLflow run and work folder and cooks nothing twice."""

from __future__ import annotations

import json

from prefect import flow
from prefect.artifacts import create_link_artifact

from soups.config import PipelineConfig
from soups.cooking import prepare_cooking
from soups.pretrain import with_resolved_start
from soups.recipes import get_recipe
from tasks.adapters.tracking import client_for, ensure_experiment, log_context, log_dataset_input, run_url, tracked_run
from tasks.context import run_context
from tasks.cooking import (
    cook_task,
    gather_ingredients,
    log_candidate_runs,
    log_kitchen_report,
    register_candidates,
    score_ingredients_task,
    tag_ingredient_scores,
)
from tasks.kitchen_runs import FINGERPRINT_TAG, failures_kept, kitchen_fingerprint, resumable_kitchen
from tasks.promotion import promote


@flow(name="kitchen", flow_run_name="kitchen-{config.experiment}", log_prints=True)
def kitchen_flow(config: PipelineConfig) -> dict:
    config = with_resolved_start(config, missing_ok=True)  # imported fine-tunes need no start (see cook loop)
    experiment_id = ensure_experiment(config)
    client = client_for(config.tracking)
    gathered = gather_ingredients(config)
    refs = gathered.refs
    fingerprint = kitchen_fingerprint(config, {r.version: r.sha256 for r in refs})
    resume = resumable_kitchen(client, experiment_id, fingerprint)
    if resume is not None:
        print(f"going on with kitchen run {resume}, which failed with this config and these ingredients")
    tags = {
        "kind": "kitchen",
        "study": config.study_name,
        FINGERPRINT_TAG: fingerprint,
        **run_context("flows/kitchen.py:kitchen_flow"),
    }
    with tracked_run(client, experiment_id, f"kitchen-{config.study_name}", tags, resume=resume) as run_id:
        workdir = (config.tracking.root / "kitchen" / run_id).resolve()
        with failures_kept(client, run_id, workdir, "soups kitchen"):
            if resume is None:  # a resumed run has them (its kitchen settings are these; sweep settings may differ)
                log_context(client, run_id, config)
                client.log_param(run_id, "ingredient_versions", ",".join(r.version for r in refs))
            if gathered.skipped:
                client.set_tag(run_id, "skipped_ingredients", json.dumps(gathered.skipped)[:5000])
            setup = prepare_cooking(config, workdir)
            for split, images in setup.evaluator.splits.items():
                log_dataset_input(client, run_id, config, split, images.labels, "evaluation")
            create_link_artifact(run_url(config.tracking, client, run_id), f"MLflow run kitchen-{config.study_name}")
            candidates = score_ingredients_task(setup, refs, workdir)
            tag_ingredient_scores(config, run_id, refs, candidates)
            heldout_scores = {c.name: c.scores["heldout"] for c in candidates}
            skipped = {}
            for choice in config.kitchen.recipes:
                recipe = get_recipe(choice.name)
                missing = setup.recipe_inputs.missing(recipe.needs)
                if missing:  # e.g. no zero-shot base when cooking fine-tunes made elsewhere without model.pretrained
                    skipped[choice.key] = f"needs {', '.join(missing)}"
                    print(f"skipping {choice.key}: it needs {', '.join(missing)} (set model.pretrained to cook it)")
                    continue
                if len(refs) < recipe.min_ingredients:
                    skipped[choice.key] = f"needs at least {recipe.min_ingredients} ingredients, {len(refs)} gathered"
                    print(f"skipping {choice.key}: it {skipped[choice.key]}")
                    continue
                candidates += cook_task(setup, choice, refs, heldout_scores, workdir)
            if skipped:
                client.set_tag(run_id, "skipped_recipes", json.dumps(skipped))
            board = log_kitchen_report(config, run_id, candidates, setup, workdir, gathered.skipped)
            registered = register_candidates(config, experiment_id, run_id, candidates, refs, setup, workdir)
            log_candidate_runs(config, experiment_id, run_id, candidates)
            decision = promote(config, run_id, registered, setup, workdir)
    return {
        "run_id": run_id,
        "resumed": resume is not None,
        "leaderboard": board,
        "promotion": decision.model_dump(),
        "registered": [r.model_dump() for r in registered],
        "skipped_ingredients": gathered.skipped,
    }
