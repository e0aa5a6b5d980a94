"""deployments/prefect.yaml points at real flows and its parameters are valid configurations."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml
from prefect import Flow

from soups.config import PipelineConfig

PREFECT_YAML = Path(__file__).resolve().parent.parent / "deployments" / "prefect.yaml"


def test_every_deployment_names_a_flow_and_a_valid_config():
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    assert spec["deployments"], "no deployments declared"
    for deployment in spec["deployments"]:
        module_path, function = deployment["entrypoint"].split(":")
        module = importlib.import_module(module_path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, function)
        assert isinstance(flow, Flow), deployment["name"]
        assert "config" in flow.parameters.properties
        if deployment["name"] != "trial":  # a sweep gives each trial its config, reference and parameters
            PipelineConfig.model_validate(deployment["parameters"]["config"])
        assert deployment["work_pool"]["name"] == "soups"  # the pool `soups stack up` starts workers for
    schedules = [s for d in spec["deployments"] for s in d.get("schedules", [])]
    assert any(s.get("cron") for s in schedules), "the pipeline should run on a schedule"
