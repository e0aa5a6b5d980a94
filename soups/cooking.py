"""Cooking without any orchestration: cook recipes from checkpoint files and score every candidate on
held-out, test and every shift set with one evaluator (splits decoded once, one module reused).

`prepare_cooking` builds, once per kitchen run, everything the recipes and the scoring share; the kitchen
flow passes that `CookingSetup` to each step instead of rebuilding it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from soups.checkpoint import Ingredient, file_sha256, load_state_dict, save_state_dict
from soups.config import KitchenConfig, PipelineConfig, RecipeChoice
from soups.data import DatasetBundle, load_dataset
from soups.evaluate import Evaluator, evaluation_splits
from soups.images import ImageSplit, ImageTensors, Preprocess, cached_or_streamed
from soups.models import empty_classifier
from soups.names import stored_name
from soups.pretrain import has_start
from soups.recipes import Dish, FitSet, NoDetails, Recipe, RecipeDetails, RecipeInputs, cook, get_recipe
from soups.runtime import resolve_device
from soups.serving import ClassifierSpec
from soups.splits import HELDOUT, HELDOUT_LOSS, ood_val_split
from soups.train import zero_shot_start

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
    tuned: dict[str, Any] | None = None
    """The grid point the held-out scoring split chose, when its entry was tuned over a grid."""
    grid: list[dict[str, Any]] = field(default_factory=list)
    """Every grid point tried: {options, heldout, heldout_loss}."""
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

    def details_json(self) -> dict[str, Any]:
        """Its details.json: ingredients, the recipe's details and, when tuned, the grid and its choice."""
        tuning = {"tuned": self.tuned, "grid": self.grid} if self.tuned is not None else {}
        return {"ingredients": self.ingredients, **self.details.as_json(), **tuning}

    def tags(self) -> dict[str, str]:
        """What a registry reader filters on: the recipe's own tags (WiSE-FT's alpha), the tuned options."""
        tuned = {"tuned": json.dumps(self.tuned)} if self.tuned is not None else {}
        return {**self.details.tags(), **tuned}


def selection_key(metric: str, scores: dict[str, float], ingredients: int) -> tuple[float, float, int]:
    """Higher is better: the selection metric, then lower held-out loss, then fewer ingredients (cheaper to
    explain). Only held-out-derived numbers: test and the reported shift sets never choose a model."""
    return scores[metric], -scores[HELDOUT_LOSS], -ingredients


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
        chosen.append(max(points, key=lambda c: selection_key(HELDOUT, c.scores, len(c.ingredients))))
    return chosen


@dataclass(frozen=True)
class Menu:
    """What one kitchen cooks, decided once from the config, the inputs and the ingredients: every entry that
    can be cooked, in order, and the others (by entry key) with why they cannot."""

    entries: list[RecipeChoice]
    skipped: dict[str, str]


def menu(kitchen: KitchenConfig, inputs: RecipeInputs, ingredients: int) -> Menu:
    """The entries of ``kitchen`` whose recipes have the inputs they need (`Recipe.needs`: no zero-shot base
    when fine-tunes made elsewhere are cooked without model.pretrained) and enough ingredients."""
    entries, skipped = [], {}
    for choice in kitchen.recipes:
        why = get_recipe(choice.name).cannot_cook(inputs, ingredients)
        if why is None:
            entries.append(choice)
        else:
            skipped[choice.key] = why
    return Menu(entries, skipped)


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
    if has_start(config):
        classifier = zero_shot_start(config.model, bundle, device)
        base = save_state_dict(classifier.state_dict(), Path(workdir) / "zero-shot.safetensors")
    else:  # fine-tunes made elsewhere: the architecture scores them; recipes that need the base are skipped
        classifier, base = empty_classifier(config.model.name, len(bundle.classnames), device), None
    preprocess = Preprocess.of(classifier)
    splits, shifts = evaluation_splits(bundle, preprocess, config.eval.cache_bytes, config.eval.workers)
    fraction, seed = config.kitchen.learned_fit_fraction, config.data.seed
    fit_rows, score_rows = heldout_partition(len(splits[HELDOUT]), fraction, seed)
    fit, splits[HELDOUT] = splits[HELDOUT].subset(fit_rows), splits[HELDOUT].subset(score_rows)
    left = max(0, config.eval.cache_bytes - sum(len(s) for s in splits.values()) * preprocess.image_bytes())
    ood = cached_or_streamed(list(bundle.ood_val.items()), preprocess, left, config.eval.workers)
    for name, dataset in bundle.ood_val.items():
        # Sets made from the held-out images themselves keep only the scoring part, like held-out.
        same = _same_images(dataset, bundle.heldout)
        splits[ood_val_split(name)] = ood[name].subset(score_rows) if same else ood[name]
    evaluator = Evaluator(
        classifier,
        splits,
        preprocess,
        shifts=shifts,
        ood_val=tuple(ood_val_split(name) for name in bundle.ood_val),
        class_subsets=_class_subsets(bundle),
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
        train_images=_train_images(config, bundle, preprocess),
        normalize=preprocess.normalize,
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


def _train_images(config: PipelineConfig, bundle: DatasetBundle, preprocess: Preprocess) -> ImageSplit | None:
    """The train split, only when a recipe needs it (the linear probe): decoded if it fits, else streamed."""
    if not any("train_images" in get_recipe(name).needs for name in config.kitchen.recipe_names()):
        return None
    split = cached_or_streamed([("train", bundle.train)], preprocess, config.eval.cache_bytes, config.eval.workers)
    return split["train"]


def _class_subsets(bundle: DatasetBundle) -> dict[str, list[int]]:
    """Evaluator split name -> the classes a shift or ood-validation set covers, when it covers only some."""
    return {(ood_val_split(n) if n in bundle.ood_val else n): classes for n, classes in bundle.class_subsets.items()}


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
                ingredient.name,
                INGREDIENT,
                [ingredient.name],
                report.scores,
                ingredient.path,
                intervals=report.intervals,
            )
        )
    return candidates


def cook_and_score(
    setup: CookingSetup, choice: RecipeChoice, ingredients: Sequence[Ingredient], out_dir: Path
) -> list[Candidate]:
    """Cook one recipe (its best grid point, when it has a grid), write each single-model dish to ``out_dir``,
    and score it on every split. A label names the dish (greedy_ties) when the recipe is listed twice."""
    tuned, curve = None, []
    if choice.grid:
        dish, tuned, curve = tune_on_heldout(setup, choice, ingredients)
        dishes = [dish]
    else:
        dishes = cook(choice.name, ingredients, setup.recipe_inputs, **choice.options)
    candidates = []
    for dish, label in zip(dishes, choice.candidate_labels(), strict=True):
        dish.name = label
        candidate = _save_and_score(setup, dish, Path(out_dir))
        candidate.tuned, candidate.grid = tuned, curve
        candidates.append(candidate)
    return candidates


def tune_on_heldout(
    setup: CookingSetup, choice: RecipeChoice, ingredients: Sequence[Ingredient]
) -> tuple[Dish, dict[str, Any], list[dict[str, Any]]]:
    """Cook every grid point and keep the dish the held-out scoring split ranks first (accuracy, then loss);
    returns it with its grid point and the whole curve."""
    best, best_key, tuned, curve = None, None, None, []
    for point in choice.grid_points():
        for dish in cook(choice.name, ingredients, setup.recipe_inputs, **point):
            if dish.state_dict is None:
                raise ValueError(f"recipe {choice.name!r} cooks ensembles, which a grid cannot tune; drop its grid")
            setup.evaluator.load(dish.state_dict)
            metrics = setup.evaluator.metrics(HELDOUT)
            tried = {k: point[k] for k in choice.grid}
            curve.append({"options": tried, HELDOUT: metrics.accuracy, HELDOUT_LOSS: metrics.loss})
            key = (metrics.accuracy, -metrics.loss)
            if best_key is None or key > best_key:
                best, best_key, tuned = dish, key, tried
    return best, tuned, curve


def _save_and_score(setup: CookingSetup, dish: Dish, out_dir: Path) -> Candidate:
    names = [i.name for i in dish.ingredients]
    details = dish.details
    if dish.state_dict is None:
        report = setup.evaluator.report(model=dish.model)
        return Candidate(dish.name, dish.recipe, names, report.scores, None, details, report.intervals)
    report = setup.evaluator.report(dish.state_dict)
    candidate = Candidate(dish.name, dish.recipe, names, report.scores, None, details, report.intervals)
    metadata = {"recipe": dish.recipe, "candidate": dish.name, "ingredients": json.dumps(names)}
    candidate.checkpoint = save_state_dict(dish.state_dict, out_dir / f"{candidate.stored_name}.safetensors", metadata)
    return candidate


def save_cooked(record: Path, candidates: Sequence[Candidate]) -> None:
    """What one kitchen step cooked and scored, written beside its checkpoints (atomically) as soon as it is
    done, so a kitchen that fails later is resumed without cooking or scoring it again. Checkpoints are
    recorded relative to the record's folder with their sha256."""
    rows = []
    for c in candidates:
        row = {k: v for k, v in asdict(c).items() if k not in ("checkpoint", "stored_name", "details")}
        row["details"] = c.details.as_json()
        if c.checkpoint is not None:
            row["checkpoint"] = os.path.relpath(c.checkpoint, record.parent)
            row["sha256"] = file_sha256(c.checkpoint)
        rows.append(row)
    record.parent.mkdir(parents=True, exist_ok=True)
    partial = record.with_name(f".{record.name}.tmp")
    partial.write_text(json.dumps(rows, indent=1))
    os.replace(partial, record)


def load_cooked(record: Path) -> list[Candidate] | None:
    """The candidates `save_cooked` recorded, or None when there is no record or one of its checkpoints is gone
    or changed (then the step is cooked again)."""
    if not record.is_file():
        return None
    candidates = []
    for row in json.loads(record.read_text()):
        digest, relative = row.pop("sha256", None), row.pop("checkpoint", None)
        checkpoint = (record.parent / relative).resolve() if relative else None
        if checkpoint is not None and (not checkpoint.is_file() or file_sha256(checkpoint) != digest):
            return None
        intervals = {k: tuple(v) for k, v in row.pop("intervals").items()}
        kind = NoDetails if row["recipe"] == INGREDIENT else get_recipe(row["recipe"]).details
        details = kind.model_validate(row.pop("details"))
        candidates.append(Candidate(**row, checkpoint=checkpoint, details=details, intervals=intervals))
    return candidates
