"""One typed configuration, validated once at the edge and passed down unchanged.

Every section has defaults that run offline on a 2-core CPU machine; a YAML file overrides any field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    """Unknown fields are errors, so a typo in a config file never silently falls back to a default."""

    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    name: str = Field("soups-vit-tiny", description="open_clip architecture name (ours or open_clip's).")
    pretrained: str | None = Field(
        None,
        description="open_clip pretrained tag, a local checkpoint file, 'local-dir:/dir', or null for random init.",
    )


class DataConfig(_Section):
    name: Literal["digits", "imagefolder", "csv"] = "digits"
    root: Path | None = Field(
        None, description="imagefolder: folder with train/ val/ test/ (+ shift folders)."
    )
    manifest: Path | None = Field(None, description="csv: manifest with columns path,label[,split].")
    seed: int = Field(0, description="Seed of the split and of the generated shift sets.")

    @model_validator(mode="after")
    def _paths_given(self) -> DataConfig:
        if self.name == "imagefolder" and self.root is None:
            raise ValueError("data.root is required when data.name is 'imagefolder'")
        if self.name == "csv" and self.manifest is None:
            raise ValueError("data.manifest is required when data.name is 'csv'")
        return self


class TrainConfig(_Section):
    """One fine-tuning run; the paper's sweep space is expressible field by field."""

    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(64, ge=1)
    warmup_steps: int = Field(10, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    mixup_alpha: float = Field(0.0, ge=0, description="Beta(alpha, alpha) mixup; 0 turns it off.")
    randaugment_m: int = Field(0, ge=0, le=30, description="RandAugment magnitude.")
    randaugment_n: int = Field(0, ge=0, le=4, description="RandAugment ops per image; 0 turns it off.")
    seed: int = 0
    device: str = Field("auto", description="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:N'.")
