"""The offline pretrained start, made once per (model, data, pretrain settings) and reused afterwards."""

from __future__ import annotations

import hashlib
from pathlib import Path

from prefect import task

from soups.config import PipelineConfig


def pretrained_start(config: PipelineConfig) -> Path:
    """Where this config's pretrained checkpoint lives; its name carries a hash of what produced it."""
    recipe = f"{config.model.name}|{config.data.model_dump_json()}|{config.pretrain.model_dump_json()}"
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    return (
        config.tracking.root / "pretrained" / f"{config.model.name}-{config.data.name}-{digest}.safetensors"
    ).resolve()


def resolve_pretrained(config: PipelineConfig) -> str | None:
    """The start fine-tunes use: the configured weights, else this config's offline pretrained checkpoint."""
    if config.model.pretrained is not None or config.pretrain is None:
        return config.model.pretrained
    path = pretrained_start(config)
    if not path.is_file():
        raise FileNotFoundError(
            f"no pretrained start at {path}; run 'soups pretrain' (or 'soups run') first, or set model.pretrained"
        )
    return str(path)


@task(name="pretrain")
def pretrain_task(config: PipelineConfig) -> str | None:
    """Pretrain contrastively when the config asks for an offline start and none exists yet."""
    if config.model.pretrained is not None or config.pretrain is None:
        return config.model.pretrained
    out = pretrained_start(config)
    if out.is_file():
        print(f"reusing pretrained start {out}")
        return str(out)
    from soups.evaluate import bundle_for
    from soups.pretrain import pretrain
    from soups.runtime import resolve_device

    result = pretrain(
        config.pretrain,
        config.model.name,
        bundle_for(config.data),
        out,
        device=resolve_device(config.train.device),
    )
    print(
        f"pretrained {config.model.name} in {result.seconds:.1f}s: zero-shot held-out accuracy "
        f"{result.zero_shot_accuracy:.3f} -> {out}"
    )
    return str(result.checkpoint)
