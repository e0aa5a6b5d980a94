"""The pretrained start as a registered model version, so a trial on any machine can fine-tune it.

A sweep that dispatches trials to workers uploads a local start once per sha256 as a version of
``<experiment>-base`` and passes ``models:/<experiment>-base/<version>`` in the config. Each machine fetches
that version into its cache folder named by the digest, checks the digest, and uses the cached copy from then
on. Tags and hub names (open_clip pretrained tags) are left as they are: each machine resolves them itself.
"""

from __future__ import annotations

from mlflow import MlflowClient

from soups.config import PipelineConfig
from soups.pretrained import REGISTRY_PREFIX, local_dir
from tasks.adapters.cache import cached_artifact, digest_of
from tasks.adapters.tracking import tracked_run

START_ARTIFACT = "start"


def base_model_name(config: PipelineConfig) -> str:
    return f"{config.experiment}-base"


def publish_start(config: PipelineConfig, client: MlflowClient, experiment_id: str) -> PipelineConfig:
    """The config with a local start replaced by its ``<experiment>-base`` version, registered on first use of
    each digest (a base run holds the file under ``start/``; the version is tagged with sha256, name, layout)."""
    local = config.model.start.local()  # a file or folder on this machine; tags and registry URIs stay
    if local is None:
        return config
    digest = digest_of(local)
    name = base_model_name(config)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(
            name,
            tags={"experiment": config.experiment},
            description=f"Pretrained starts of experiment {config.experiment}, one version per sha256: what "
            "trials on other machines fine-tune (models:/ URIs in their configs).",
        )
    known = [v for v in client.search_model_versions(f"name = '{name}'") if v.tags.get("sha256") == digest]
    if known:
        version = min(known, key=lambda v: int(v.version))
    else:
        tags = {"kind": "base", "sha256": digest, "start": str(local)}
        with tracked_run(client, experiment_id, f"base-{digest[:12]}", tags) as run_id:
            if local.is_dir():
                client.log_artifacts(run_id, str(local), f"{START_ARTIFACT}/{local.name}")
            else:
                client.log_artifact(run_id, str(local), START_ARTIFACT)
        version = client.create_model_version(
            name,
            source=f"{client.get_run(run_id).info.artifact_uri}/{START_ARTIFACT}",
            run_id=run_id,
            tags={
                "sha256": digest,
                "path": local.name,
                "layout": "local-dir" if local.is_dir() else "file",
                "model_name": config.model.name,
            },
            description=f"{config.model.name} start from {local} (sha256 {digest}).",
        )
    uri = f"{REGISTRY_PREFIX}{name}/{version.version}"
    print(f"pretrained start {local} is {uri} (sha256 {digest[:12]}…) for trials on any worker")
    return config.with_pretrained(uri)


def fetched_start(config: PipelineConfig, client: MlflowClient) -> PipelineConfig:
    """The config with a ``models:/`` start replaced by this machine's verified copy (downloaded once per digest
    into ``tracking.cache_dir``); any other start unchanged."""
    if config.model.start.kind != "registry":
        return config
    name, version_number = config.model.start.registry_version()
    version = client.get_model_version(name, version_number)
    digest, local_name = version.tags["sha256"], version.tags["path"]
    cache_dir = config.tracking.resolved_cache_dir()
    path = cached_artifact(client, f"{version.source}/{local_name}", digest, cache_dir)
    return config.with_pretrained(local_dir(path) if path.is_dir() else str(path))
