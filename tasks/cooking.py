"""Cooking tasks of the kitchen flow: gather ingredients from the registry, cook and score candidates, report,
register the soups.

The kitchen flow builds one `CookingSetup` (evaluator, decoded splits, classifier spec) per run and hands it
to these tasks; they never rebuild it. Tasks that take it are not cached (modules cannot be hashed).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from soups.checkpoint import (
    CheckpointError,
    IncompatibleCheckpointsError,
    Ingredient,
    ensure_finite,
    iter_tensors,
    layout_differences,
    read_header,
    weights_digest,
)
from soups.config import PipelineConfig, RecipeChoice
from soups.cooking import (
    Candidate,
    CookingSetup,
    cook_and_score,
    load_cooked,
    promotable,
    save_cooked,
    score_ingredients,
)
from soups.names import unique_stored_names
from tasks.adapters.cache import ChecksumMismatchError, cached_artifact
from tasks.adapters.tracking import (
    PARENT_RUN_TAG,
    client_for,
    ingredients_model_name,
    nested_runs,
    run_url,
    tracked_run,
    weights_uri,
)
from tasks.kitchen_runs import failing_as


class IngredientRef(BaseModel):
    """A registered ingredient, fetched to a local file whose sha256 matched the registry's tag."""

    version: str
    run_id: str
    checkpoint: Path
    sha256: str
    trial: int | None = None
    """The sweep trial that made it (None for imports)."""

    @property
    def name(self) -> str:
        """What the leaderboard calls it: ``trial-<n>`` like its MLflow run and logged model (its registry
        version's ``trial_number`` tag says which); ``ingredient-v<version>`` for an import, or when two studies'
        trials share a number in one kitchen."""
        return f"trial-{self.trial}" if self.trial is not None else f"ingredient-v{self.version}"

    def ingredient(self, score: float | None = None) -> Ingredient:
        """As a recipe ingredient with its held-out ``score`` as the kitchen measured it (greedy compares like
        with like: every ingredient is scored with the evaluator the soups are scored with)."""
        return Ingredient(self.checkpoint, score, self.name, {"version": self.version, "run_id": self.run_id})


class Gathered(BaseModel):
    """What the kitchen cooks from, and the registered versions it leaves out with why."""

    refs: list[IngredientRef]
    skipped: dict[str, str]


@task(name="gather-ingredients")
def gather_ingredients(config: PipelineConfig) -> Gathered:
    """Every registered version of the study (or the configured versions), from this machine's cache by sha256
    (downloaded and checked the first time, then reused by every kitchen run).

    A bad ingredient is skipped, not fatal: a version whose run did not finish (its process died between
    registering and finishing), whose checkpoint cannot be fetched, or whose copy fails its checksum. Each is
    printed with its reason (the kitchen records them on its run). Fails when fewer than two usable ones remain
    of a pool that lost some, when none is usable, or when two candidates would get one stored name."""
    from mlflow.exceptions import MlflowException

    client = client_for(config.tracking)
    model = ingredients_model_name(config)
    versions = client.search_model_versions(f"name='{model}'")
    wanted = config.kitchen.ingredient_versions
    if wanted:
        chosen = [v for v in versions if int(v.version) in set(wanted)]
        missing = sorted(set(wanted) - {int(v.version) for v in chosen})
        if missing:
            raise ValueError(f"ingredient versions {missing} are not in {model}")
    else:
        chosen = [v for v in versions if v.tags.get("study") == config.study_name]
    if not chosen:
        raise ValueError(f"no ingredients registered for study {config.study_name!r}; run the sweep first")
    refs: list[IngredientRef] = []
    skipped: dict[str, str] = {}  # version -> why it is not cooked
    for version in sorted(chosen, key=lambda v: int(v.version)):
        number = str(version.version)
        try:
            run = client.get_run(version.run_id)
            if run.info.status != "FINISHED":
                why = run.data.tags.get("failure_reason") or "its process died before the run finished"
                skipped[number] = f"its run {version.run_id} is {run.info.status}, not FINISHED ({why})"
            else:
                digest = version.tags["sha256"]
                path = cached_artifact(client, weights_uri(version), digest, config.tracking.resolved_cache_dir())
                check_readable_and_finite(path)
                number_tag = version.tags.get("trial_number", "")
                is_trial = run.data.tags.get("kind") == "ingredient" and number_tag.isdigit()
                trial = int(number_tag) if is_trial else None
                ref = IngredientRef(version=number, run_id=version.run_id, checkpoint=path, sha256=digest, trial=trial)
                refs.append(ref)
        except (ChecksumMismatchError, CheckpointError) as err:
            skipped[number] = f"{type(err).__name__}: {' '.join(str(err).split())}; re-run that trial"
        except (MlflowException, OSError, KeyError) as err:
            skipped[number] = f"its checkpoint cannot be fetched: {type(err).__name__}: {' '.join(str(err).split())}"
        if number in skipped:
            skipped[number] = skipped[number][:1000]
            print(f"skipping ingredient version {number}: {skipped[number]}")
    trial_names = [ref.name for ref in refs]
    refs = [ref if trial_names.count(ref.name) == 1 else ref.model_copy(update={"trial": None}) for ref in refs]
    foreign = foreign_layouts(refs)
    refs = [ref for ref in refs if ref.version not in foreign]
    for version, why in foreign.items():
        skipped[version] = why[:1000]
        print(f"skipping ingredient version {version}: {skipped[version]}")
    if not refs or (skipped and len(refs) < 2):
        kept = ", ".join(r.version for r in refs) or "none"
        reasons = "; ".join(f"version {v}: {why}" for v, why in skipped.items())
        raise ValueError(
            f"only {len(refs)} usable ingredient(s) of study {config.study_name!r} (versions: {kept}), and a soup "
            f"needs two; skipped {reasons}. Re-run the sweep to register good ones"
        )
    labels = [label for choice in config.kitchen.recipes for label in choice.candidate_labels()]
    unique_stored_names([ref.name for ref in refs] + labels)
    print(f"gathered {len(refs)} ingredients: versions {', '.join(r.version for r in refs)}")
    return Gathered(refs=refs, skipped=skipped)


CHECKED = ".readable-and-finite"
"""Marker beside a cached checkpoint: its header reads and every tensor is finite (checked once per digest)."""


def check_readable_and_finite(path: Path) -> None:
    """Raise `CheckpointError` unless the header reads and no tensor holds NaN or inf. The cached copy is
    named by its digest, so a pass is recorded once beside it and not paid again."""
    marker = path.parent / CHECKED
    if marker.exists():
        return
    read_header(path)
    for key, tensor in iter_tensors(path):
        ensure_finite(key, tensor, str(path))
    marker.touch()


def foreign_layouts(refs: list[IngredientRef]) -> dict[str, str]:
    """Versions whose tensors (keys, shapes, dtypes) differ from the layout most ingredients share, with why:
    fine-tunes of another architecture, which no recipe can average with the rest."""
    layouts = {ref.version: read_header(ref.checkpoint) for ref in refs}
    shapes = {v: sorted((k, tuple(t.shape), t.dtype) for k, t in layout.items()) for v, layout in layouts.items()}
    common = max(shapes.values(), key=list(shapes.values()).count, default=None)
    reference = next((v for v, shape in shapes.items() if shape == common), None)
    return {
        version: f"{IncompatibleCheckpointsError.__name__}: its tensors differ from those of version {reference}, "
        f"which most ingredients share ({'; '.join(layout_differences(layouts[reference], layouts[version])[:3])})"
        for version, shape in shapes.items()
        if shape != common
    }


def cooked_record(workdir: Path, step: str) -> Path:
    """Where a kitchen step's candidates are recorded (`soups.cooking.save_cooked`)."""
    return Path(workdir) / "cooked" / f"{step}.json"


@task(name="score-ingredients", cache_policy=NO_CACHE)
def score_ingredients_task(setup: CookingSetup, refs: list[IngredientRef], workdir: Path) -> list[Candidate]:
    """Each ingredient scored on every split, or read back from this kitchen run's record of it."""
    record = cooked_record(workdir, "ingredients")
    recorded = load_cooked(record)
    if recorded is not None and [c.name for c in recorded] == [r.name for r in refs]:
        print(f"ingredient scores read back from {record}")
        return [replace(c, checkpoint=r.checkpoint) for c, r in zip(recorded, refs, strict=True)]
    candidates = score_ingredients(setup, [r.ingredient() for r in refs])
    save_cooked(record, [replace(c, checkpoint=None) for c in candidates])  # the cache keeps the files
    return candidates


@task(name="cook", task_run_name="cook-{choice.stored_name}", cache_policy=NO_CACHE)
def cook_task(
    setup: CookingSetup,
    choice: RecipeChoice,
    refs: list[IngredientRef],
    heldout_scores: dict[str, float],
    workdir: Path,
) -> list[Candidate]:
    """One kitchen entry cooked and scored, or read back when this kitchen run recorded it before it failed."""
    record = cooked_record(workdir, f"recipe-{choice.stored_name}")
    candidates = load_cooked(record)
    if candidates is not None:
        print(f"{choice.key}: read back from {record}, not cooked again")
    else:
        ingredients = [r.ingredient(heldout_scores[r.name]) for r in refs]
        with failing_as("cook", choice.key):
            candidates = cook_and_score(setup, choice, ingredients, Path(workdir) / "soups")
        save_cooked(record, candidates)
    for c in candidates:
        print(
            f"{c.name}: held-out {c.scores['heldout']:.4f}, test {c.scores['test']:.4f}, "
            f"shift mean {c.scores.get('shift_mean', float('nan')):.4f} ({len(c.ingredients)} ingredients)"
        )
    return candidates


@task(name="tag-ingredients", cache_policy=NO_CACHE)
def tag_ingredient_scores(
    config: PipelineConfig, kitchen_run_id: str, refs: list[IngredientRef], candidates: list[Candidate]
) -> None:
    """Each ingredient version tagged with this kitchen's scores, ``kitchen.<metric>``: ``kitchen.heldout`` is
    the scoring part of held-out (the leaderboard's column), beside the trial's own ``heldout_accuracy`` tag on
    the whole held-out split; ``kitchen.run_id`` says which kitchen measured them."""
    client = client_for(config.tracking)
    model = ingredients_model_name(config)
    scores = {c.name: c.scores for c in candidates}
    for ref in refs:
        for metric, value in scores[ref.name].items():
            client.set_model_version_tag(model, ref.version, f"kitchen.{metric}", f"{value:.4f}")
        client.set_model_version_tag(model, ref.version, "kitchen.run_id", kitchen_run_id)


@task(name="log-candidates", cache_policy=NO_CACHE)
def log_candidate_runs(
    config: PipelineConfig, experiment_id: str, kitchen_run_id: str, candidates: list[Candidate]
) -> None:
    """The leaderboard rows that have no run yet, as runs nested under the kitchen run: each WiSE-FT α and
    every ensemble, with their scores as metrics and their details, so every row can be found in the MLflow
    UI (ingredients are their trials' runs; registered soups have soup runs with their models; a row whose
    weights another row registered first, e.g. WiSE-FT at α 1, gets a run here too)."""
    from mlflow.entities import Metric

    client = client_for(config.tracking)
    nested = nested_runs(client, experiment_id, kitchen_run_id)
    now = int(time.time() * 1000)
    for candidate in candidates:
        earlier = nested.get(candidate.stored_name)
        if candidate.recipe == "ingredient" or (earlier is not None and earlier.info.status == "FINISHED"):
            continue
        tags = {PARENT_RUN_TAG: kitchen_run_id, "kind": "candidate", "recipe": candidate.recipe}
        tags["candidate"] = candidate.name
        resume = earlier.info.run_id if earlier is not None else None
        with (
            failing_as("log-candidates", candidate.name),
            tracked_run(client, experiment_id, candidate.stored_name, tags, resume=resume) as run_id,
        ):
            metrics = [Metric(key, value, now, 0) for key, value in candidate.scores.items()]
            client.log_batch(run_id, metrics=metrics)
            if "alpha" in candidate.details:
                client.log_param(run_id, "alpha", repr(candidate.details["alpha"]))
            client.log_dict(run_id, {"ingredients": candidate.ingredients, **candidate.details}, "details.json")


@task(name="log-kitchen-report", cache_policy=NO_CACHE)
def log_kitchen_report(
    config: PipelineConfig,
    run_id: str,
    candidates: list[Candidate],
    setup: CookingSetup,
    workdir: Path,
    skipped: dict[str, str] | None = None,
) -> list[dict]:
    """Leaderboard (MLflow table + CSV + Prefect table), figures and the reproduction report, logged to the
    kitchen run."""
    import matplotlib.pyplot as plt

    from soups.report import (
        accuracy_vs_shift_figure,
        greedy_trajectory_figure,
        grid_figure,
        leaderboard,
        mixing_weights_figure,
    )
    from soups.reproduction import reproduction_report

    board = leaderboard(candidates)
    logged = cooked_record(workdir, "report")
    if logged.is_file():  # a resumed kitchen: the same candidates, already reported (log_table would append)
        print(f"leaderboard, figures and report.md were logged before this kitchen failed ({logged})")
        return board.to_dict("records")
    client = client_for(config.tracking)
    csv_path = Path(workdir) / "leaderboard.csv"
    board.to_csv(csv_path, index=False)
    client.log_artifact(run_id, str(csv_path))
    client.log_table(run_id, board, "leaderboard.json")
    create_table_artifact(
        board.round(4).to_dict("records"),
        key=f"{config.experiment.lower()}-leaderboard",
        description=f"Soup leaderboard of study {config.study_name}; the kitchen's MLflow run: "
        f"{run_url(config.tracking, client, run_id)}",
    )
    figures = {
        "accuracy_vs_shift.png": accuracy_vs_shift_figure(board),
        "heldout_vs_shift.png": accuracy_vs_shift_figure(board, y="heldout"),
    }
    by_recipe = {c.recipe: c for c in candidates}
    if "greedy" in by_recipe:
        figures["greedy_trajectory.png"] = greedy_trajectory_figure(by_recipe["greedy"].details["trajectory"])
    for recipe in ("learned", "learned_by_layer"):
        if recipe in by_recipe:
            c = by_recipe[recipe]
            figures[f"{recipe}_weights.png"] = mixing_weights_figure(c.details["coefficients"], c.ingredients)
    for c in candidates:
        if "grid" in c.details:
            figures[f"{c.stored_name}_grid.png"] = grid_figure(c.name, c.details["grid"], c.details["tuned"])
    for name, figure in figures.items():
        client.log_figure(run_id, figure, name)
        plt.close(figure)
    sizes = {name: len(split) for name, split in setup.evaluator.splits.items()}
    report = reproduction_report(
        board,
        study=config.study_name,
        split_sizes=sizes,
        figures=list(figures),
        resamples=config.kitchen.bootstrap,
        skipped=skipped,
    )
    report_path = Path(workdir) / "report.md"
    report_path.write_text(report)
    client.log_artifact(run_id, str(report_path))
    print(f"reproduction report: {report_path}")
    logged.write_text(json.dumps({"figures": sorted(figures), "report": str(report_path)}))
    return board.to_dict("records")


class RegisteredCandidate(BaseModel):
    name: str
    recipe: str
    version: str
    scores: dict[str, float]
    intervals: dict[str, tuple[float, float]] = {}
    ingredients: int


@task(name="register-soups", cache_policy=NO_CACHE)
def register_candidates(
    config: PipelineConfig,
    experiment_id: str,
    kitchen_run_id: str,
    candidates: list[Candidate],
    refs: list[IngredientRef],
    setup: CookingSetup,
    workdir: Path,
) -> list[RegisteredCandidate]:
    """Each promotable model (soups, best single, best WiSE-FT) as a version of the registered model
    ``<experiment>``; a model whose weights are already registered (same weights digest) keeps its version."""
    client = client_for(config.tracking)
    existing = {
        v.tags.get("weights_sha256"): str(v.version)
        for v in client.search_model_versions(f"name='{config.experiment}'")
    }
    versions_by_name = {r.name: r.version for r in refs}
    nested = nested_runs(client, experiment_id, kitchen_run_id)
    registered = []
    for candidate in promotable(candidates):
        with failing_as("register-soups", candidate.name):
            digest = weights_digest(candidate.checkpoint)
            version = existing.get(digest)
            if version is None:
                lineage = {
                    "recipe": candidate.recipe,
                    "candidate": candidate.name,
                    "stored_name": candidate.stored_name,
                    "weights_sha256": digest,
                    "study": config.study_name,
                    "heldout": repr(candidate.scores["heldout"]),
                }
                if candidate.ingredients:  # the zero-shot row and the linear probe use none: no empty tag
                    lineage["ingredient_versions"] = ",".join(versions_by_name.get(n, n) for n in candidate.ingredients)
                if "alpha" in candidate.details:  # WiSE-FT: which point of the α sweep this is
                    lineage["alpha"] = repr(candidate.details["alpha"])
                earlier = nested.get(candidate.stored_name)
                resume = earlier.info.run_id if earlier is not None else None
                version = _log_and_register(
                    config, experiment_id, kitchen_run_id, candidate, setup, workdir, lineage, resume
                )
                existing[digest] = version
        registered.append(
            RegisteredCandidate(
                name=candidate.name,
                recipe=candidate.recipe,
                version=version,
                scores=candidate.scores,
                intervals=candidate.intervals,
                ingredients=len(candidate.ingredients),
            )
        )
        print(f"{candidate.name} is version {version} of {config.experiment}")
    return registered


_TAG_LIMIT = 5000


def _description(candidate: Candidate) -> str:
    """What a registry reader needs: how it was made and how it scores, with the noise of those scores."""
    low, high = candidate.intervals.get("heldout", (None, None))
    noise = f" (95 % interval {low:.4f}-{high:.4f})" if low is not None else ""
    made = f"{candidate.recipe} of {len(candidate.ingredients)} ingredient(s)"
    if "tuned" in candidate.details:
        made += f", options {candidate.details['tuned']} chosen on held-out"
    scores = ", ".join(f"{k} {v:.4f}" for k, v in candidate.scores.items() if k not in ("heldout", "heldout_loss"))
    return (
        f"{candidate.name}: {made}. Held-out accuracy (scoring part, which selects) {candidate.scores['heldout']:.4f}"
        f"{noise}; reported only: {scores}."
    )


def _log_and_register(
    config: PipelineConfig,
    experiment_id: str,
    kitchen_run_id: str,
    candidate: Candidate,
    setup: CookingSetup,
    workdir: Path,
    lineage: dict[str, str],
    resume: str | None,
) -> str:
    """One nested run per soup (scores, details.json, the pyfunc model) and a registry version whose tags
    are set at creation, so a version never exists without its sha256 and lineage. ``resume``: the soup's run
    from an earlier try of this kitchen, reopened (its logged model reused when it was uploaded whole)."""
    from mlflow.entities import Metric

    from tasks.adapters.packaging import log_classifier_model, logged_model_of

    client = client_for(config.tracking)
    tags = {PARENT_RUN_TAG: kitchen_run_id, "kind": "soup", "recipe": candidate.recipe, "candidate": candidate.name}
    with tracked_run(client, experiment_id, candidate.stored_name, tags, resume=resume) as run_id:
        for key, value in candidate.scores.items():
            client.log_metric(run_id, key, value)
        losses = candidate.details.get("losses", [])
        for start in range(0, len(losses), 1000):  # the learned soup's fit, one point per optimiser step
            now = int(time.time() * 1000)
            batch = [Metric("fit_loss", v, now, start + i + 1) for i, v in enumerate(losses[start : start + 1000])]
            client.log_batch(run_id, metrics=batch)
        for step, point in enumerate(candidate.details.get("grid", [])):  # the held-out tuning curve
            client.log_metric(run_id, "grid_heldout", point["heldout"], step=step)
        client.log_dict(run_id, {"ingredients": candidate.ingredients, **candidate.details}, "details.json")
        version_tags = dict(lineage)
        if "tuned" in candidate.details:
            version_tags["tuned"] = json.dumps(candidate.details["tuned"])
        if "coefficients" in candidate.details:
            coefficients = json.dumps(candidate.details["coefficients"])
            too_long = len(coefficients) > _TAG_LIMIT
            version_tags["coefficients"] = f"per tensor, see details.json of run {run_id}" if too_long else coefficients
        logged = logged_model_of(client, run_id, candidate.stored_name) if resume else None
        if logged is None:
            folder = Path(workdir) / "packages" / candidate.stored_name
            logged = log_classifier_model(
                client, run_id, candidate.checkpoint, setup.spec, folder, candidate.stored_name
            )
        source, model_id = logged
        version = client.create_model_version(
            config.experiment,
            source=source,
            run_id=run_id,
            tags=version_tags,
            description=_description(candidate),
            model_id=model_id,
        )
    return str(version.version)
