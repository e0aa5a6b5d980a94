"""The kitchen's candidates in MLflow: each promotable one as a soup run with its packaged model and a version
of the registered model ``<experiment>``, and every other leaderboard row as a run nested under the kitchen's."""

from __future__ import annotations

import time
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field

from soups.candidates import Candidate, promotable
from soups.checkpoint import weights_digest
from soups.selection import selection_key
from soups.serving import ClassifierSpec
from soups.splits import HELDOUT, HELDOUT_LOSS
from tasks.adapters.packaging import log_classifier_model, logged_model_of
from tasks.adapters.tracking import PARENT_RUN_TAG, bounded, nested_runs, tracked_run
from tasks.context import RunContext
from tasks.gathering import IngredientRef
from tasks.kitchen_runs import failing_as


class RegisteredCandidate(BaseModel):
    """A registry version as promotion weighs it: its scores, which of them are in-sample, and its per-image
    hits on the evaluator's splits (for the paired margin; not part of what the flows return)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str
    recipe: str
    version: str
    scores: dict[str, float]
    intervals: dict[str, tuple[float, float]] = {}
    ingredients: int
    in_sample: list[str] = []
    hits: dict[str, Any] = Field(default_factory=dict, exclude=True)

    def key(self, metric: str) -> tuple[float, float, int, float]:
        """Its place in `soups.selection` order on ``metric`` (the version breaks a full tie: the older wins)."""
        return selection_key(self.scores[metric], self.scores[HELDOUT_LOSS], self.ingredients, self.version)


@task(name="register-soups", cache_policy=NO_CACHE)
def register_candidates(
    run: RunContext, spec: ClassifierSpec, candidates: list[Candidate], refs: list[IngredientRef]
) -> list[RegisteredCandidate]:
    """Each promotable model (soups, best single, the best point of a sweep such as WiSE-FT's α) as a version of
    the registered model ``<experiment>``; a model whose weights are already registered (same weights digest)
    keeps its version."""
    config = run.config
    existing = {
        v.tags.get("weights_sha256"): str(v.version)
        for v in run.client.search_model_versions(f"name='{config.experiment}'")
    }
    versions_by_name = {r.name: r.version for r in refs}
    nested = nested_runs(run.client, run.experiment_id, run.run_id)
    registered = []
    for candidate in promotable(candidates):
        with failing_as("register-soups", candidate.name):
            digest = weights_digest(candidate.checkpoint)
            version = existing.get(digest)
            if version is None:
                lineage = {
                    "recipe": candidate.recipe,
                    "candidate": candidate.name,
                    "stored_name": candidate.stored_name,
                    "weights_sha256": digest,
                    "study": config.study_name,
                    "heldout": repr(candidate.scores["heldout"]),
                }
                if candidate.ingredients:  # the zero-shot row and the linear probe use none: no empty tag
                    lineage["ingredient_versions"] = ",".join(versions_by_name.get(n, n) for n in candidate.ingredients)
                earlier = nested.get(candidate.stored_name)
                resume = earlier.info.run_id if earlier is not None else None
                version = _log_and_register(run, spec, candidate, lineage, resume)
                existing[digest] = version
        registered.append(
            RegisteredCandidate(
                name=candidate.name,
                recipe=candidate.recipe,
                version=version,
                scores=candidate.scores,
                intervals=candidate.intervals,
                ingredients=len(candidate.ingredients),
                in_sample=candidate.in_sample,
                hits=candidate.hits,
            )
        )
        print(f"{candidate.name} is version {version} of {config.experiment}")
    return registered


def _description(candidate: Candidate) -> str:
    """What a registry reader needs: how it was made and how it scores, with the noise of those scores."""
    low, high = candidate.intervals.get(HELDOUT, (None, None))
    noise = f" (95 % interval {low:.4f}-{high:.4f})" if low is not None else ""
    made = f"{candidate.recipe} of {len(candidate.ingredients)} ingredient(s)"
    if candidate.tuned is not None:
        made += f", options {candidate.tuned} chosen on held-out"
    scores = ", ".join(f"{k} {v:.4f}" for k, v in candidate.scores.items() if k not in (HELDOUT, HELDOUT_LOSS))
    which = (
        "in-sample: its own fitting images; never promotes it" if HELDOUT in candidate.in_sample else "which selects"
    )
    return (
        f"{candidate.name}: {made}. Held-out accuracy ({which}) {candidate.scores[HELDOUT]:.4f}"
        f"{noise}; reported only: {scores}."
    )


def _log_and_register(
    run: RunContext, spec: ClassifierSpec, candidate: Candidate, lineage: dict[str, str], resume: str | None
) -> str:
    """One nested run per soup (scores, details.json, the pyfunc model) and a registry version whose tags
    are set at creation, so a version never exists without its sha256 and lineage. ``resume``: the soup's run
    from an earlier try of this kitchen, reopened (its logged model reused when it was uploaded whole)."""
    client = run.client
    tags = {PARENT_RUN_TAG: run.run_id, "kind": "soup", "recipe": candidate.recipe, "candidate": candidate.name}
    with tracked_run(client, run.experiment_id, candidate.stored_name, tags, resume=resume) as run_id:
        for key, value in candidate.scores.items():
            client.log_metric(run_id, key, value)
        for metric, values in candidate.details.curves().items():  # e.g. the learned soup's fit, steps from 1
            _log_series(client, run_id, metric, values, first_step=1)
        _log_series(client, run_id, "grid_heldout", [point[HELDOUT] for point in candidate.grid], first_step=0)
        client.log_dict(run_id, candidate.details_json(), "details.json")
        version_tags = {**lineage, **{key: bounded(value, run_id) for key, value in candidate.tags().items()}}
        logged = logged_model_of(client, run_id, candidate.stored_name) if resume else None
        if logged is None:
            folder = run.workdir / "packages" / candidate.stored_name
            logged = log_classifier_model(client, run_id, candidate.checkpoint, spec, folder, candidate.stored_name)
        source, model_id = logged
        version = client.create_model_version(
            run.config.experiment,
            source=source,
            run_id=run_id,
            tags=version_tags,
            description=_description(candidate),
            model_id=model_id,
        )
    return str(version.version)


def _log_series(client, run_id: str, metric: str, values: list[float], first_step: int) -> None:
    """One metric point per step, in batches MLflow accepts."""
    from mlflow.entities import Metric

    for start in range(0, len(values), 1000):
        now = int(time.time() * 1000)
        chunk = values[start : start + 1000]
        batch = [Metric(metric, v, now, first_step + start + i) for i, v in enumerate(chunk)]
        client.log_batch(run_id, metrics=batch)


@task(name="log-candidates", cache_policy=NO_CACHE)
def log_candidate_runs(run: RunContext, candidates: list[Candidate]) -> None:
    """The leaderboard rows that have no run yet, as runs nested under the kitchen run: each WiSE-FT α and
    every ensemble, with their scores as metrics and their details, so every row can be found in the MLflow
    UI (ingredients are their trials' runs; registered soups have soup runs with their models; a row whose
    weights another row registered first, e.g. WiSE-FT at α 1, gets a run here too)."""
    from mlflow.entities import Metric, Param

    client = run.client
    nested = nested_runs(client, run.experiment_id, run.run_id)
    now = int(time.time() * 1000)
    for candidate in candidates:
        earlier = nested.get(candidate.stored_name)
        if candidate.is_ingredient or (earlier is not None and earlier.info.status == "FINISHED"):
            continue
        tags = {
            PARENT_RUN_TAG: run.run_id,
            "kind": "candidate",
            "recipe": candidate.recipe,
            "candidate": candidate.name,
        }
        resume = earlier.info.run_id if earlier is not None else None
        with (
            failing_as("log-candidates", candidate.name),
            tracked_run(client, run.experiment_id, candidate.stored_name, tags, resume=resume) as run_id,
        ):
            metrics = [Metric(key, value, now, 0) for key, value in candidate.scores.items()]
            client.log_batch(run_id, metrics=metrics)
            params = {key: bounded(value, run_id) for key, value in candidate.tags().items()}
            client.log_batch(run_id, params=[Param(key, value) for key, value in params.items()])
            client.log_dict(run_id, candidate.details_json(), "details.json")
