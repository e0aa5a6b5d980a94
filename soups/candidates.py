"""A candidate: one row of the leaderboard, the unit every output of the kitchen is keyed by, and its record on
disk (so a kitchen that fails later goes on without cooking or scoring it again)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from soups.checkpoint import file_sha256
from soups.names import stored_name
from soups.recipes import NoDetails, Recipe, RecipeDetails, get_recipe
from soups.selection import selection_key
from soups.splits import HELDOUT, HELDOUT_LOSS

INGREDIENT = "ingredient"
"""The `Candidate.recipe` of a raw ingredient (a fine-tune scored as it is; no recipe cooked it)."""


@dataclass
class Candidate:
    """One row of the leaderboard: a model, how it was made, and how it scores. Every output of the kitchen
    (leaderboard row, figure, nested run, registry version, promotion) is keyed by its label."""

    name: str
    """Its label, for people: the leaderboard, report.md and log lines (``wise_ft_0.60``)."""
    recipe: str
    ingredients: list[str]
    scores: dict[str, float]
    checkpoint: Path | None = None
    details: RecipeDetails = field(default_factory=NoDetails)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    hits: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    """Per split, which images it got right (bool): what paired comparisons between candidates resample."""
    tuned: dict[str, Any] | None = None
    """The grid point the held-out scoring split chose, when its entry was tuned over a grid."""
    grid: list[dict[str, Any]] = field(default_factory=list)
    """Every grid point tried: {options, heldout, heldout_loss}."""
    in_sample: list[str] = field(default_factory=list)
    """Scores measured on the images it was fitted to (a learned soup under the whole-held-out protocol): they
    are marked wherever they appear and never choose it."""
    stored_name: str = field(init=False)
    """What every store calls it (files, MLflow runs and logged models, tags, aliases): `soups.names`."""

    def __post_init__(self) -> None:
        self.stored_name = stored_name(self.name)

    @property
    def is_single_model(self) -> bool:
        """Ensembles cost N forward passes; only single models can be promoted."""
        return self.checkpoint is not None

    @property
    def is_ingredient(self) -> bool:
        return self.recipe == INGREDIENT

    @property
    def made_by(self) -> Recipe | None:
        """The recipe that cooked it; None for a raw ingredient."""
        return None if self.is_ingredient else get_recipe(self.recipe)

    def key(self, metric: str = HELDOUT) -> tuple[float, float, int, float]:
        """Its place in `soups.selection` order on ``metric``."""
        return selection_key(self.scores[metric], self.scores[HELDOUT_LOSS], len(self.ingredients))

    def details_json(self) -> dict[str, Any]:
        """Its details.json: ingredients, the recipe's details and, when tuned, the grid and its choice."""
        tuning = {"tuned": self.tuned, "grid": self.grid} if self.tuned is not None else {}
        in_sample = {"in_sample": self.in_sample} if self.in_sample else {}
        return {"ingredients": self.ingredients, **self.details.as_json(), **tuning, **in_sample}

    def tags(self) -> dict[str, str]:
        """What a registry reader filters on: the recipe's own tags (WiSE-FT's alpha), the tuned options."""
        tuned = {"tuned": json.dumps(self.tuned)} if self.tuned is not None else {}
        in_sample = {"in_sample": ",".join(self.in_sample)} if self.in_sample else {}
        return {**self.details.tags(), **tuned, **in_sample}


def promotable(candidates: list[Candidate]) -> list[Candidate]:
    """Single models cooked by a recipe its module declares promotable (not raw ingredients); of a sweep
    recipe's points (WiSE-FT's α) only the best by held-out."""
    chosen, sweeps = [], {}
    for c in candidates:
        recipe = c.made_by
        if recipe is None or not recipe.promotable or not c.is_single_model:
            continue
        if recipe.sweep is None:
            chosen.append(c)
        else:
            sweeps.setdefault(recipe.name, []).append(c)
    for points in sweeps.values():
        chosen.append(max(points, key=Candidate.key))
    return chosen


def save_cooked(record: Path, candidates: Sequence[Candidate]) -> None:
    """What one kitchen step cooked and scored, written beside its checkpoints (atomically, the per-image hits
    first) as soon as it is done. Checkpoints are recorded relative to the record's folder with their sha256."""
    rows, hits = [], {}
    for index, c in enumerate(candidates):
        row = {k: v for k, v in asdict(c).items() if k not in ("checkpoint", "stored_name", "details", "hits")}
        row["details"] = c.details.as_json()
        if c.checkpoint is not None:
            row["checkpoint"] = os.path.relpath(c.checkpoint, record.parent)
            row["sha256"] = file_sha256(c.checkpoint)
        rows.append(row)
        hits.update({f"{index}/{split}": h.to(torch.uint8).contiguous() for split, h in c.hits.items()})
    record.parent.mkdir(parents=True, exist_ok=True)
    partial = record.with_name(f".{record.name}.tmp")
    save_file(hits, str(partial))
    os.replace(partial, _hits_file(record))
    partial.write_text(json.dumps(rows, indent=1))
    os.replace(partial, record)


def load_cooked(record: Path) -> list[Candidate] | None:
    """The candidates `save_cooked` recorded, or None when there is no record or one of its checkpoints (or its
    hits) is gone or changed (then the step is cooked again)."""
    if not record.is_file() or not _hits_file(record).is_file():
        return None
    hits = load_file(str(_hits_file(record)))
    candidates = []
    for index, row in enumerate(json.loads(record.read_text())):
        digest, relative = row.pop("sha256", None), row.pop("checkpoint", None)
        checkpoint = (record.parent / relative).resolve() if relative else None
        if checkpoint is not None and (not checkpoint.is_file() or file_sha256(checkpoint) != digest):
            return None
        intervals = {k: tuple(v) for k, v in row.pop("intervals").items()}
        kind = NoDetails if row["recipe"] == INGREDIENT else get_recipe(row["recipe"]).details
        details = kind.model_validate(row.pop("details"))
        own = {key.split("/", 1)[1]: h.bool() for key, h in hits.items() if key.split("/", 1)[0] == str(index)}
        candidates.append(Candidate(**row, checkpoint=checkpoint, details=details, intervals=intervals, hits=own))
    return candidates


def _hits_file(record: Path) -> Path:
    return record.with_name(f"{record.stem}.hits.safetensors")
