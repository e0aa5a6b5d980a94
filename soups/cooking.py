"""Cooking without any orchestration: cook recipes from checkpoint files and score every candidate on
held-out, test and every shift set with one evaluator (splits decoded once, one module reused).

`prepare_cooking` builds, once per kitchen run, everything the recipes and the scoring share; the kitchen
flow passes that `CookingSetup` to each step instead of rebuilding it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from soups.candidates import INGREDIENT, Candidate
from soups.checkpoint import Ingredient, save_state_dict
from soups.config import KitchenConfig, PipelineConfig, RecipeChoice
from soups.data import DatasetBundle, load_dataset
from soups.evaluate import Evaluator, evaluation_splits
from soups.images import ImageSplit, ImageTensors, Preprocess, cached_or_streamed
from soups.models import empty_classifier
from soups.pretrain import has_start
from soups.recipes import Dish, FitSet, RecipeInputs, cook, get_recipe
from soups.runtime import resolve_device
from soups.selection import selection_key
from soups.serving import ClassifierSpec
from soups.splits import HELDOUT, HELDOUT_LOSS, ood_val_split
from soups.train import zero_shot_start


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
    fit_scored: tuple[str, ...] = ()
    """Scores measured on the very images learned soups fit on (the whole-held-out protocol); empty when the
    held-out split is cut into a fitting and a scoring part."""


def prepare_cooking(config: PipelineConfig, workdir: Path) -> CookingSetup:
    """Zero-shot start (the WiSE-FT base), evaluator over every split, and the learned soups' fitting images.

    With ``kitchen.learned_fit_fraction`` above 0, learned soups fit their mixing weights on one part of the
    held-out split and every candidate is scored, selected and promoted on the other part (``heldout`` in the
    leaderboard), so no soup is chosen on the images it was fitted to. With 0 (the official protocol), learned
    soups fit on the whole held-out split and greedy scores it whole; the learned soups' held-out scores are
    then in-sample (`CookingSetup.fit_scored`).
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
    whole = config.kitchen.learned_fit_fraction == 0
    if whole:  # the official protocol: one copy of held-out, fitted on and scored whole
        fit, score_rows, fit_scored = splits[HELDOUT], None, [HELDOUT, HELDOUT_LOSS]
    else:
        fit_rows, score_rows = heldout_partition(
            len(splits[HELDOUT]), config.kitchen.learned_fit_fraction, config.data.seed
        )
        fit, splits[HELDOUT], fit_scored = splits[HELDOUT].subset(fit_rows), splits[HELDOUT].subset(score_rows), []
    left = max(0, config.eval.cache_bytes - sum(len(s) for s in splits.values()) * preprocess.image_bytes())
    ood = cached_or_streamed(list(bundle.ood_val.items()), preprocess, left, config.eval.workers)
    for name, dataset in bundle.ood_val.items():
        # Sets made from the held-out images themselves are scored on the rows held-out is, and are in-sample
        # for learned soups under the whole-held-out protocol.
        same = _same_images(dataset, bundle.heldout)
        splits[ood_val_split(name)] = ood[name].subset(score_rows) if same and not whole else ood[name]
        if same and whole:
            fit_scored.append(ood_val_split(name))
    evaluator = Evaluator(
        classifier,
        splits,
        preprocess,
        shifts=shifts,
        ood_val=tuple(ood_val_split(name) for name in bundle.ood_val),
        class_groups=_class_groups(bundle),
        device=device,
        batch_size=config.train.eval_batch_size,
        bootstrap=config.kitchen.bootstrap,
        seed=config.data.seed,
        precision=config.eval.precision,
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
    spec = ClassifierSpec(config.model.name, list(bundle.classnames), preprocess)
    return CookingSetup(evaluator, inputs, spec, tuple(fit_scored))


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


def _class_groups(bundle: DatasetBundle) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Evaluator split name -> how a shift or ood-validation set not scored on the model's classes one for one is
    scored: per class of its own, the model classes pooled (`DatasetBundle.class_groups`)."""
    return {(ood_val_split(n) if n in bundle.ood_val else n): groups for n, groups in bundle.class_groups.items()}


def _same_images(dataset: Any, heldout: Any) -> bool:
    """Whether ``dataset`` is a transformed copy of the held-out split, row for row (digits' ood-val sets)."""
    rows, held = getattr(dataset, "indices", None), getattr(heldout, "indices", None)
    return rows is not None and held is not None and len(rows) == len(held) and bool((rows == held).all())


def score_ingredients(setup: CookingSetup, ingredients: Sequence[Ingredient]) -> list[Candidate]:
    """Each ingredient streamed into the evaluator's one module and scored: one ingredient in memory at a time,
    and only as that module's weights."""
    candidates = []
    for ingredient in ingredients:
        report = setup.evaluator.report(path=ingredient.path)
        candidates.append(
            Candidate(
                ingredient.name,
                INGREDIENT,
                [ingredient.name],
                report.scores,
                ingredient.path,
                intervals=report.intervals,
                hits=report.hits,
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
    fitted_on_heldout = "fit_batches" in get_recipe(choice.name).needs
    candidates = []
    for dish, label in zip(dishes, choice.candidate_labels(), strict=True):
        dish.name = label
        candidate = _save_and_score(setup, dish, Path(out_dir))
        candidate.tuned, candidate.grid = tuned, curve
        candidate.in_sample = list(setup.fit_scored) if fitted_on_heldout else []
        candidates.append(candidate)
    return candidates


def tune_on_heldout(
    setup: CookingSetup, choice: RecipeChoice, ingredients: Sequence[Ingredient]
) -> tuple[Dish, dict[str, Any], list[dict[str, Any]]]:
    """Cook every grid point and keep the dish the held-out scoring split ranks first (`soups.selection` order;
    the earlier point on a full tie); returns it with its grid point and the whole curve."""
    best, best_key, tuned, curve = None, None, None, []
    for point in choice.grid_points():
        for dish in cook(choice.name, ingredients, setup.recipe_inputs, **point):
            if dish.state_dict is None:
                raise ValueError(f"recipe {choice.name!r} cooks ensembles, which a grid cannot tune; drop its grid")
            setup.evaluator.load(dish.state_dict)
            metrics = setup.evaluator.metrics(HELDOUT)
            tried = {k: point[k] for k in choice.grid}
            curve.append({"options": tried, HELDOUT: metrics.accuracy, HELDOUT_LOSS: metrics.loss})
            key = selection_key(metrics.accuracy, metrics.loss, len(dish.ingredients))
            if best_key is None or key > best_key:
                best, best_key, tuned = dish, key, tried
    return best, tuned, curve


def _save_and_score(setup: CookingSetup, dish: Dish, out_dir: Path) -> Candidate:
    names = [i.name for i in dish.ingredients]
    details = dish.details
    if dish.state_dict is None:
        report = setup.evaluator.report(model=dish.model)
        return Candidate(dish.name, dish.recipe, names, report.scores, None, details, report.intervals, report.hits)
    report = setup.evaluator.report(dish.state_dict)
    candidate = Candidate(dish.name, dish.recipe, names, report.scores, None, details, report.intervals, report.hits)
    metadata = {"recipe": dish.recipe, "candidate": dish.name, "ingredients": json.dumps(names)}
    candidate.checkpoint = save_state_dict(dish.state_dict, out_dir / f"{candidate.stored_name}.safetensors", metadata)
    return candidate
