"""The offline pretrained start, made once per (model, data, pretrain settings) and reused afterwards."""

from __future__ import annotations

from prefect import task

from soups.config import PipelineConfig


@task(name="pretrain")
def pretrain_task(config: PipelineConfig) -> PipelineConfig:
    """The config with its pretrained start resolved, pretraining contrastively first when the config asks for
    an offline start and none exists yet."""
    from soups.pretrain import needs_offline_start, start_path, with_resolved_start

    if not needs_offline_start(config):
        return config
    out = start_path(config)
    if out.is_file():
        print(f"reusing pretrained start {out}")
        return with_resolved_start(config)
    from soups.pretrain import pretrain_start

    result = pretrain_start(config)
    print(
        f"pretrained {config.model.name} in {result.seconds:.1f}s: zero-shot held-out accuracy "
        f"{result.zero_shot_accuracy:.3f} -> {out}"
    )
    return with_resolved_start(config)
