"""Promotion on its own: re-score the study's registered soups on today's data and promote the best."""

from __future__ import annotations

from prefect import flow

from soups.checkpoint import load_state_dict
from soups.config import PipelineConfig
from tasks.kitchen import RegisteredCandidate, kitchen_setup
from tasks.pretraining import resolve_pretrained
from tasks.promotion import download_weights, promote
from tasks.tracking import client_for, ensure_experiment, tracked_run


@flow(name="promote", log_prints=True)
def promote_flow(config: PipelineConfig, pretrained: str | None = None) -> dict:
    pretrained = pretrained or resolve_pretrained(config)
    experiment_id = ensure_experiment(config)
    client = client_for(config.tracking)
    versions = [
        v
        for v in client.search_model_versions(f"name='{config.experiment}'")
        if v.tags.get("study") == config.study_name
    ]
    if not versions:
        raise ValueError(f"no soups of study {config.study_name!r} in {config.experiment}; run the kitchen first")
    with tracked_run(client, experiment_id, f"promote-{config.study_name}", {"kind": "promotion"}) as run_id:
        workdir = (config.tracking.root / "promote" / run_id).resolve()
        evaluator = kitchen_setup(config, pretrained, workdir).evaluator
        candidates = []
        for version in versions:
            scores = evaluator.report(load_state_dict(download_weights(config, str(version.version), workdir)))
            recipe = version.tags.get("recipe", "unknown")
            candidates.append(
                RegisteredCandidate(name=recipe, recipe=recipe, version=str(version.version), scores=scores)
            )
        decision = promote(config, run_id, candidates, pretrained, workdir)
    return decision.model_dump()
