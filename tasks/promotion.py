"""Promotion: the best candidate by the promotion metric becomes ``champion`` only if it beats the current
champion re-scored on the same data now; otherwise it becomes ``challenger``. Running it twice changes
nothing the second time."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress

import torch
from mlflow.exceptions import MlflowException
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from soups.checkpoint import load_state_dict
from soups.config import PipelineConfig
from soups.cooking import CookingSetup
from soups.evaluate import Report
from soups.intervals import PairedDifference
from soups.recipes import RECIPES
from tasks.adapters.packaging import download_model_weights
from tasks.adapters.tracking import ui_url
from tasks.context import RunContext
from tasks.kitchen_runs import failing_as
from tasks.registration import RegisteredCandidate

CHAMPION, CHALLENGER = "champion", "challenger"
Paired = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], str], PairedDifference | None]


class NothingToPromoteError(ValueError):
    """The kitchen produced no model that could be served on its own."""


class PromotionDecision(BaseModel):
    metric: str
    candidate: str
    candidate_version: str
    candidate_score: float
    champion_version: str | None
    champion_score: float | None
    outcome: str
    margin: str


@task(name="promote", cache_policy=NO_CACHE)
def promote(run: RunContext, candidates: list[RegisteredCandidate], setup: CookingSetup) -> PromotionDecision:
    """``run``: the kitchen's or the promotion's run, which records the decision."""
    config = run.config
    metric = config.kitchen.promotion_metric
    candidates = eligible(candidates, metric)
    if not candidates:
        promotable = [r.name for r in RECIPES.values() if r.promotable]
        raise NothingToPromoteError(
            f"no single-model candidates to promote on {metric} (recipes: {config.kitchen.recipe_names()}); an "
            f"ensemble is not one model and in-sample scores never promote: add one of {', '.join(promotable)} "
            "to kitchen.recipes"
        )
    # `soups.selection` order: the metric, lower held-out loss, fewer ingredients, then the older version (the
    # reigning champion keeps a full tie, so promoting the same candidates twice changes nothing).
    ranked = sorted(candidates, key=lambda c: c.key(metric), reverse=True)
    best = ranked[0]
    rival = ranked[1] if len(ranked) > 1 else None
    with failing_as("promote", best.name), promotion_lock(config):  # read, compare, move the alias: one step
        client = run.client
        name = config.experiment
        champion = _alias(client, name, CHAMPION)
        champion_score = None
        if champion is None:
            outcome = "champion (first)"
            client.set_registered_model_alias(name, CHAMPION, best.version)
        elif str(champion.version) == best.version:
            outcome = "champion (unchanged: already the champion)"
            champion_score = best.scores[metric]
        else:
            rival = registered_candidate(champion, rescore(run, str(champion.version), setup))
            champion_score = rival.scores[metric]
            if best.key(metric) > rival.key(metric):
                outcome = "champion (beats the previous champion)"
                client.set_registered_model_alias(name, CHAMPION, best.version)
            else:
                outcome = "challenger (does not beat the champion)"
                client.set_registered_model_alias(name, CHALLENGER, best.version)
        decision = PromotionDecision(
            metric=metric,
            candidate=best.name,
            candidate_version=best.version,
            candidate_score=best.scores[metric],
            champion_version=str(champion.version) if champion else None,
            champion_score=champion_score,
            outcome=outcome,
            margin=margin_note(metric, best, rival, setup.evaluator.paired),
        )
        _log(run, decision)
        return decision


def eligible(candidates: list[RegisteredCandidate], metric: str) -> list[RegisteredCandidate]:
    """The candidates whose ``metric`` was not measured on their own fitting images (a learned soup under the
    whole-held-out protocol is scored on the images it fitted): in-sample scores never win a promotion."""
    in_sample = [c.name for c in candidates if metric in c.in_sample]
    if in_sample:
        print(f"not promoted on {metric}, measured on their own fitting images: {', '.join(in_sample)}")
    return [c for c in candidates if metric not in c.in_sample]


@contextmanager
def promotion_lock(config: PipelineConfig) -> Iterator[None]:
    """One promotion of a model at a time, so two kitchens finishing together each compare against the champion
    the other may just have set (read, compare and move the alias as one step). A file lock in the data root
    when MLflow is a store on this machine; with a tracking server, a global concurrency limit of one on the
    Prefect server every machine shares (a lease: a holder that dies releases it)."""
    name = f"promote-{config.experiment}"
    if not config.tracking.served():
        from filelock import FileLock

        config.tracking.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(config.tracking.root / f".{name}.lock")):
            yield
        return
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as prefect, suppress(ObjectAlreadyExists):
        prefect.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    with concurrency(name, occupy=1, strict=True):
        yield


def margin_note(metric: str, winner: RegisteredCandidate, rival: RegisteredCandidate | None, compare: Paired) -> str:
    """Whether the winner's lead over the next model is more than the noise of this evaluation: a paired
    bootstrap of the difference on the same images (``compare``: the evaluator's, `Evaluator.paired`)."""
    if rival is None:
        return "no other candidate"
    lead = winner.scores[metric] - rival.scores[metric]
    paired = compare(winner.hits, rival.hits, metric) if winner.hits and rival.hits else None
    if paired is None:
        return f"lead {lead:+.4f} over {rival.name} (v{rival.version}); no paired interval (kitchen.bootstrap 0)"
    verdict = "resolved by this data" if paired.resolved else "not resolved by this data (the interval includes 0)"
    return (
        f"lead {lead:+.4f} over {rival.name} (v{rival.version}), paired 95 % interval "
        f"[{paired.low:+.4f}, {paired.high:+.4f}]: {verdict}"
    )


def registered_candidate(version, report: Report) -> RegisteredCandidate:
    """A registered version re-scored now, as a candidate (its ingredient count from its lineage tag)."""
    ingredients = [v for v in version.tags.get("ingredient_versions", "").split(",") if v]
    recipe = version.tags.get("recipe", "unknown")
    return RegisteredCandidate(
        name=version.tags.get("candidate", recipe),  # its label (versions older than labels: the recipe)
        recipe=recipe,
        version=str(version.version),
        scores=report.scores,
        intervals=report.intervals,
        ingredients=len(ingredients),
        in_sample=[s for s in version.tags.get("in_sample", "").split(",") if s],
        hits=report.hits,
    )


def _alias(client, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def rescore(run: RunContext, version: str, setup: CookingSetup) -> Report:
    """Score a registered version on today's data with the same evaluator as the candidates."""
    folder = run.workdir / f"registered-v{version}"
    weights = download_model_weights(run.client, run.config.experiment, version, folder)
    return setup.evaluator.report(load_state_dict(weights))


def _log(run: RunContext, decision: PromotionDecision) -> None:
    client, run_id, name, tracking = run.client, run.run_id, run.config.experiment, run.config.tracking
    client.set_tag(run_id, "promotion.outcome", decision.outcome)
    client.set_tag(run_id, "promotion.candidate_version", decision.candidate_version)
    client.set_tag(run_id, "promotion.margin", decision.margin)
    client.log_metric(run_id, "promotion.candidate_score", decision.candidate_score)
    if decision.champion_score is not None:
        client.log_metric(run_id, "promotion.champion_score", decision.champion_score)
    previous = (
        "none"
        if decision.champion_version is None
        else (f"version {decision.champion_version} at {decision.champion_score:.4f}")
    )
    create_markdown_artifact(
        f"## Promotion of `{name}`\n\n- candidate: **{decision.candidate}** (version {decision.candidate_version}), "
        f"{decision.metric} {decision.candidate_score:.4f}\n- previous champion: {previous}\n"
        f"- outcome: **{decision.outcome}**\n- margin: {decision.margin}\n"
        f"- in MLflow: [{name} version {decision.candidate_version}]"
        f"({ui_url(tracking, f'models/{name}/versions/{decision.candidate_version}')})\n",
        key=f"{name.lower()}-promotion",
        description="champion / challenger decision",
    )
    print(
        f"promotion: {decision.candidate} (v{decision.candidate_version}, {decision.metric} "
        f"{decision.candidate_score:.4f}) -> {decision.outcome}; previous champion {previous}; {decision.margin}"
    )
