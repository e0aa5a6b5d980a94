"""Cooking tasks of the kitchen flow: set up the evaluator once, decide what can be cooked, score the
ingredients and cook each entry, recording every step so a failed kitchen goes on without cooking again.

The kitchen flow builds one `CookingSetup` (evaluator, decoded splits, classifier spec) per run and hands it
to these tasks; they never rebuild it. Tasks that take it are not cached (modules cannot be hashed).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from prefect import task
from prefect.artifacts import create_link_artifact
from prefect.cache_policies import NO_CACHE

from soups.candidates import Candidate, load_cooked, save_cooked
from soups.config import RecipeChoice
from soups.cooking import CookingSetup, Menu, cook_and_score, menu, prepare_cooking, score_ingredients
from soups.splits import HELDOUT, HELDOUT_LOSS
from tasks.adapters.tracking import TAG_LIMIT, log_context, log_dataset_input, run_url
from tasks.context import RunContext
from tasks.gathering import Gathered, IngredientRef
from tasks.kitchen_runs import failing_as


@task(name="prepare-cooking", cache_policy=NO_CACHE)
def prepare_cooking_task(run: RunContext, gathered: Gathered) -> CookingSetup:
    """The evaluator and recipe inputs, built once; the kitchen run records its config, ingredients and every
    split it scores on (a reopened run has its config and ingredients already)."""
    config, client = run.config, run.client
    if not run.resumed:  # a resumed run has them (its kitchen settings are these; sweep settings may differ)
        log_context(client, run.run_id, config)
        client.log_param(run.run_id, "ingredient_versions", ",".join(r.version for r in gathered.refs))
    if gathered.skipped:
        client.set_tag(run.run_id, "skipped_ingredients", json.dumps(gathered.skipped)[:TAG_LIMIT])
    setup = prepare_cooking(config, run.workdir)
    for split, images in setup.evaluator.splits.items():
        log_dataset_input(client, run.run_id, config, split, images.labels, "evaluation")
    create_link_artifact(run_url(config.tracking, client, run.run_id), f"MLflow run kitchen-{config.study_name}")
    return setup


@task(name="plan-kitchen", cache_policy=NO_CACHE)
def plan_kitchen(run: RunContext, setup: CookingSetup, refs: list[IngredientRef]) -> Menu:
    """The entries this kitchen cooks (`soups.cooking.menu`); the others are printed and tagged with why."""
    planned = menu(run.config.kitchen, setup.recipe_inputs, len(refs))
    for key, why in planned.skipped.items():
        print(f"skipping {key}: it {why}")
    if planned.skipped:
        run.client.set_tag(run.run_id, "skipped_recipes", json.dumps(planned.skipped))
    return planned


def cooked_record(workdir: Path, step: str) -> Path:
    """Where a kitchen step's candidates are recorded (`soups.cooking.save_cooked`)."""
    return Path(workdir) / "cooked" / f"{step}.json"


@task(name="score-ingredients", cache_policy=NO_CACHE)
def score_ingredients_task(run: RunContext, setup: CookingSetup, refs: list[IngredientRef]) -> list[Candidate]:
    """Each ingredient scored on every split, or read back from this kitchen run's record of it."""
    record = cooked_record(run.workdir, "ingredients")
    recorded = load_cooked(record)
    if recorded is not None and [c.name for c in recorded] == [r.name for r in refs]:
        print(f"ingredient scores read back from {record}")
        return [replace(c, checkpoint=r.checkpoint) for c, r in zip(recorded, refs, strict=True)]
    candidates = score_ingredients(setup, [r.ingredient() for r in refs])
    save_cooked(record, [replace(c, checkpoint=None) for c in candidates])  # the cache keeps the files
    return candidates


@task(name="cook", task_run_name="cook-{choice.stored_name}", cache_policy=NO_CACHE)
def cook_task(
    run: RunContext, setup: CookingSetup, choice: RecipeChoice, refs: list[IngredientRef], scored: list[Candidate]
) -> list[Candidate]:
    """One kitchen entry cooked from the ingredients (``scored``: their candidates, whose held-out scores rank
    them) and scored, or read back when this kitchen run recorded it before it failed."""
    record = cooked_record(run.workdir, f"recipe-{choice.stored_name}")
    candidates = load_cooked(record)
    if candidates is not None:
        print(f"{choice.key}: read back from {record}, not cooked again")
    else:
        heldout = {c.name: c.scores for c in scored}
        ingredients = [r.ingredient(heldout[r.name][HELDOUT], heldout[r.name][HELDOUT_LOSS]) for r in refs]
        with failing_as("cook", choice.key):
            candidates = cook_and_score(setup, choice, ingredients, run.workdir / "soups")
        save_cooked(record, candidates)
    for c in candidates:
        print(
            f"{c.name}: held-out {c.scores['heldout']:.4f}, test {c.scores['test']:.4f}, "
            f"shift mean {c.scores.get('shift_mean', float('nan')):.4f} ({len(c.ingredients)} ingredients)"
        )
    return candidates
