"""Promotion: the best candidate by the promotion metric becomes ``champion`` only if it beats the current
champion re-scored on the same data now; otherwise it becomes ``challenger``. Running it twice changes
nothing the second time."""

from __future__ import annotations

from pathlib import Path

from mlflow.exceptions import MlflowException
from prefect import task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel

from soups.checkpoint import load_state_dict
from soups.config import PipelineConfig
from soups.serving import WEIGHTS_FILE
from tasks.kitchen import RegisteredCandidate, kitchen_setup
from tasks.tracking import client_for

CHAMPION, CHALLENGER = "champion", "challenger"


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


@task(name="promote")
def promote(
    config: PipelineConfig,
    kitchen_run_id: str,
    candidates: list[RegisteredCandidate],
    pretrained: str | None,
    workdir: Path,
) -> PromotionDecision:
    metric = config.kitchen.promotion_metric
    if not candidates:
        raise NothingToPromoteError(
            f"no single-model candidates to promote (recipes: {config.kitchen.recipes}); an ensemble is not one "
            "model: add 'best', 'uniform', 'greedy' or a learned soup to kitchen.recipes"
        )
    client = client_for(config.tracking)
    name = config.experiment
    champion = _alias(client, name, CHAMPION)
    reigning = str(champion.version) if champion else None
    # Ties: the reigning champion wins (promoting the same candidates twice changes nothing), then the
    # candidate that is better on the other metric (a soup that matches held-out but is more robust).
    other = "shift_mean" if metric == "heldout" else "heldout"
    best = max(candidates, key=lambda c: (c.scores[metric], c.version == reigning, c.scores.get(other, 0.0)))
    champion_score = None
    if champion is None:
        outcome = "champion (first)"
        client.set_registered_model_alias(name, CHAMPION, best.version)
    elif str(champion.version) == best.version:
        outcome = "champion (unchanged: already the champion)"
        champion_score = best.scores[metric]
    else:
        champion_score = rescore(config, str(champion.version), metric, pretrained, workdir)
        if best.scores[metric] > champion_score:
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
    )
    _log(client, kitchen_run_id, decision, name)
    return decision


def _alias(client, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def download_weights(config: PipelineConfig, version: str, workdir: Path) -> Path:
    """The safetensors weights of a registered version, fetched locally (never unpickled)."""
    import mlflow

    mlflow.set_tracking_uri(config.tracking.resolved_mlflow_uri())
    folder = Path(workdir) / f"registered-v{version}"
    local = mlflow.artifacts.download_artifacts(f"models:/{config.experiment}/{version}", dst_path=str(folder))
    weights = next(Path(local).rglob(WEIGHTS_FILE), None)
    if weights is None:
        raise FileNotFoundError(f"version {version} of {config.experiment} has no {WEIGHTS_FILE}; cannot score it")
    return weights


def rescore(config: PipelineConfig, version: str, metric: str, pretrained: str | None, workdir: Path) -> float:
    """Score a registered version on today's data with the same evaluator as the candidates."""
    weights = download_weights(config, version, workdir)
    return kitchen_setup(config, pretrained, workdir).evaluator.report(load_state_dict(weights))[metric]


def _log(client, run_id: str, decision: PromotionDecision, name: str) -> None:
    client.set_tag(run_id, "promotion.outcome", decision.outcome)
    client.set_tag(run_id, "promotion.candidate_version", decision.candidate_version)
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
        f"- outcome: **{decision.outcome}**\n",
        key=f"{name.lower()}-promotion",
        description="champion / challenger decision",
    )
    print(
        f"promotion: {decision.candidate} (v{decision.candidate_version}, {decision.metric} "
        f"{decision.candidate_score:.4f}) -> {decision.outcome}; previous champion {previous}"
    )
