"""Cooking without any orchestration: cook recipes from checkpoint files and score every candidate on
held-out, test and every shift set with one evaluator (splits decoded once, one module reused).

`prepare_cooking` builds, once per kitchen run, everything the recipes and the scoring share; the kitchen
flow passes that `CookingSetup` to each step instead of rebuilding it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from soups.checkpoint import Ingredient, load_state_dict, save_state_dict
from soups.config import PipelineConfig, RecipeChoice
from soups.data import load_dataset
from soups.evaluate import Evaluator, ImageTensors, Preprocess, decode, evaluation_splits
from soups.recipes import Dish, FitSet, RecipeInputs, cook
from soups.runtime import resolve_device
from soups.serving import ClassifierSpec
from soups.train import zero_shot_start


@dataclass
class Candidate:
    """One row of the leaderboard: a model, how it was made, and how it scores."""

    name: str
    recipe: str
    ingredients: list[str]
    scores: dict[str, float]
    checkpoint: Path | None = None
    details: dict[str, Any] = field(default_factory=dict)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def is_single_model(self) -> bool:
        """Ensembles cost N forward passes; only single models can be promoted."""
        return self.checkpoint is not None


def selection_key(metric: str, scores: dict[str, float], ingredients: int) -> tuple[float, float, int]:
    """Higher is better: the selection metric, then lower held-out loss, then fewer ingredients (cheaper to
    explain). Only held-out-derived numbers: test and the reported shift sets never choose a model."""
    return scores[metric], -scores["heldout_loss"], -ingredients


def promotable(candidates: list[Candidate]) -> list[Candidate]:
    """Single-model candidates other than raw ingredients; of the WiSE-FT sweep only its best α by held-out."""
    chosen = [c for c in candidates if c.is_single_model and c.recipe not in ("ingredient", "wise_ft")]
    wise = [c for c in candidates if c.recipe == "wise_ft"]
    if wise:
        chosen.append(max(wise, key=lambda c: selection_key("heldout", c.scores, len(c.ingredients))))
    return chosen


@dataclass
class CookingSetup:
    """Built once per kitchen run: the evaluator every candidate is scored with, what recipes receive, and the
    spec a packaged model needs (architecture, class names, preprocessing)."""

    evaluator: Evaluator
    recipe_inputs: RecipeInputs
    spec: ClassifierSpec


def prepare_cooking(config: PipelineConfig, workdir: Path) -> CookingSetup:
    """Zero-shot start (the WiSE-FT base), evaluator over every split, and the learned soups' fitting images.

    Learned soups fit their mixing weights on one part of the held-out split; every candidate is then
    scored and promoted on the other part (``heldout`` in the leaderboard), so a soup is never chosen on
    the very images it was fitted to. Greedy selection uses that scoring part, as the paper's greedy soup does.
    """
    device = resolve_device(config.train.device)
    bundle = load_dataset(config.data)
    classifier = zero_shot_start(config.model, bundle, device)
    base = save_state_dict(classifier.state_dict(), Path(workdir) / "zero-shot.safetensors")
    preprocess = Preprocess.of(classifier)
    splits, shifts = evaluation_splits(bundle, preprocess)
    fraction, seed = config.kitchen.learned_fit_fraction, config.data.seed
    fit_rows, score_rows = heldout_partition(len(splits["heldout"]), fraction, seed)
    fit, splits["heldout"] = splits["heldout"].subset(fit_rows), splits["heldout"].subset(score_rows)
    for name, dataset in bundle.ood_val.items():
        decoded = decode(dataset, preprocess)
        # Sets made from the held-out images themselves keep only the scoring part, like held-out.
        splits[f"oodval_{name}"] = decoded.subset(score_rows) if _same_images(dataset, bundle.heldout) else decoded
    evaluator = Evaluator(
        classifier,
        splits,
        preprocess,
        shifts=shifts,
        ood_val=tuple(f"oodval_{name}" for name in bundle.ood_val),
        device=device,
        batch_size=config.train.eval_batch_size,
        bootstrap=config.kitchen.bootstrap,
        seed=config.data.seed,
    )
    inputs = RecipeInputs(
        evaluate=evaluator.accuracy,
        module=classifier,
        fit_batches=FitSet(fit.images, fit.labels, preprocess.normalize, str(device)),
        base=base,
        device=str(device),
        heldout_logits=evaluator.logits,
        heldout_labels=evaluator.labels(),
    )
    return CookingSetup(evaluator, inputs, ClassifierSpec(config.model.name, list(bundle.classnames), preprocess))


def heldout_partition(size: int, fit_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded disjoint (fit, score) row indices of the held-out split."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    cut = max(1, min(size - 1, round(fit_fraction * size)))
    return order[:cut], order[cut:]


def split_heldout(data: ImageTensors, fit_fraction: float, seed: int) -> tuple[ImageTensors, ImageTensors]:
    """The held-out split cut into the learned soups' fitting part and the scoring part."""
    fit, score = heldout_partition(len(data), fit_fraction, seed)
    return data.subset(fit), data.subset(score)


def _same_images(dataset: Any, heldout: Any) -> bool:
    """Whether ``dataset`` is a transformed copy of the held-out split, row for row (digits' ood-val sets)."""
    rows, held = getattr(dataset, "indices", None), getattr(heldout, "indices", None)
    return rows is not None and held is not None and len(rows) == len(held) and bool((rows == held).all())


def score_ingredients(setup: CookingSetup, ingredients: Sequence[Ingredient]) -> list[Candidate]:
    candidates = []
    for ingredient in ingredients:
        report = setup.evaluator.report(load_state_dict(ingredient.path))
        candidates.append(
            Candidate(
                ingredient.name, "ingredient", [ingredient.name], report.scores, ingredient.path, {}, report.intervals
            )
        )
    return candidates


def cook_and_score(
    setup: CookingSetup, choice: RecipeChoice, ingredients: Sequence[Ingredient], out_dir: Path
) -> list[Candidate]:
    """Cook one recipe, write each single-model dish to ``out_dir``, and score it on every split."""
    dishes = cook(choice.name, ingredients, setup.recipe_inputs, **choice.options)
    return [_save_and_score(setup, dish, Path(out_dir)) for dish in dishes]


def _save_and_score(setup: CookingSetup, dish: Dish, out_dir: Path) -> Candidate:
    names = [i.name for i in dish.ingredients]
    details = jsonable(dish.details)
    if dish.state_dict is None:
        report = setup.evaluator.report(model=dish.model)
        return Candidate(dish.name, dish.recipe, names, report.scores, None, details, report.intervals)
    checkpoint = save_state_dict(
        dish.state_dict, out_dir / f"{dish.name}.safetensors", {"recipe": dish.recipe, "ingredients": json.dumps(names)}
    )
    report = setup.evaluator.report(dish.state_dict)
    return Candidate(dish.name, dish.recipe, names, report.scores, checkpoint, details, report.intervals)


def jsonable(value: Any) -> Any:
    """Details (trajectories, coefficients) as plain JSON types, for tags, artifacts and flow results."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value
