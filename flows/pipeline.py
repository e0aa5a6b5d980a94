"""The whole job in one flow: pretrain (only when configured) -> sweep -> kitchen."""

from __future__ import annotations

from prefect import flow

from flows.kitchen import kitchen_flow
from flows.sweep import sweep_flow
from soups.config import PipelineConfig
from tasks.pretraining import pretrain_task


@flow(name="soup-pipeline", flow_run_name="pipeline-{config.experiment}", log_prints=True)
def pipeline_flow(config: PipelineConfig) -> dict:
    config = pretrain_task(config)
    sweep = sweep_flow(config)  # raises when no trial finished: nothing to cook
    kitchen = kitchen_flow(config)
    return {"pretrained": config.model.pretrained, "sweep": sweep, "kitchen": kitchen}
