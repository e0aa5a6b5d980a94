"""Promotion on its own: re-score the study's registered soups on today's data and promote the best."""

from __future__ import annotations

from prefect import flow

from soups.config import PipelineConfig
from soups.cooking import prepare_cooking
from soups.pretrain import with_resolved_start
from tasks.adapters.tracking import client_for, ensure_experiment, tracked_run
from tasks.context import RunContext, run_context
from tasks.promotion import promote, registered_candidate, rescore


@flow(name="promote", flow_run_name="promote-{config.experiment}", log_prints=True)
def promote_flow(config: PipelineConfig, experiment_id: str | None = None) -> dict:
    """``experiment_id``: the experiment the command that starts this flow ensured (a deployed run ensures it)."""
    config = with_resolved_start(config, missing_ok=True)  # re-scoring needs the architecture, not the start
    experiment_id = experiment_id or ensure_experiment(config)
    client = client_for(config.tracking)
    versions = [
        v
        for v in client.search_model_versions(f"name='{config.experiment}'")
        if v.tags.get("study") == config.study_name
    ]
    if not versions:
        raise ValueError(f"no soups of study {config.study_name!r} in {config.experiment}; run the kitchen first")
    tags = {"kind": "promotion", "study": config.study_name, **run_context("flows/promote.py:promote_flow")}
    with tracked_run(client, experiment_id, f"promote-{config.study_name}", tags) as run_id:
        run = RunContext(config, client, experiment_id, run_id, (config.tracking.root / "promote" / run_id).resolve())
        setup = prepare_cooking(config, run.workdir)
        candidates = [registered_candidate(v, rescore(run, str(v.version), setup)) for v in versions]
        decision = promote(run, candidates, setup)
    return decision.model_dump()
