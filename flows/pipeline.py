"""The whole job in one flow: pretrain (only when configured) -> sweep -> kitchen."""

from __future__ import annotations

from prefect import flow

from flows.kitchen import kitchen_flow
from flows.sweep import sweep_flow
from soups.config import PipelineConfig
from tasks.adapters.tracking import ensure_experiment
from tasks.pretraining import pretrain_task


@flow(name="soup-pipeline", flow_run_name="pipeline-{config.experiment}", log_prints=True)
def pipeline_flow(config: PipelineConfig, experiment_id: str | None = None) -> dict:
    """``experiment_id``: the experiment the command ensured; ensured here once otherwise, for both stages."""
    config = pretrain_task(config)
    experiment_id = experiment_id or ensure_experiment(config)
    sweep = sweep_flow(config, experiment_id)  # raises when no trial finished: nothing to cook
    kitchen = kitchen_flow(config, experiment_id)
    return {"pretrained": config.model.pretrained, "sweep": sweep, "kitchen": kitchen}
