"""Gathering the kitchen's ingredients: every usable registered version of the study, fetched to this machine
and checked, with the versions left out and why; and, once scored, each version tagged with the kitchen's scores."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from soups.candidates import Candidate
from soups.checkpoint import (
    CheckpointError,
    IncompatibleCheckpointsError,
    Ingredient,
    ensure_finite,
    iter_tensors,
    layout_differences,
    read_header,
)
from soups.config import PipelineConfig
from soups.names import unique_stored_names
from tasks.adapters.cache import ChecksumMismatchError, cached_artifact
from tasks.adapters.tracking import client_for, ingredients_model_name, weights_uri
from tasks.context import RunContext


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

    def ingredient(self, score: float | None = None, loss: float | None = None) -> Ingredient:
        """As a recipe ingredient with its held-out ``score`` and ``loss`` as the kitchen measured them (greedy
        compares like with like: every ingredient is scored with the evaluator the soups are scored with; the
        version breaks full ties)."""
        origin = {"version": self.version, "run_id": self.run_id}
        return Ingredient(self.checkpoint, score, self.name, origin, loss)


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


@task(name="tag-ingredients", cache_policy=NO_CACHE)
def tag_ingredient_scores(run: RunContext, refs: list[IngredientRef], candidates: list[Candidate]) -> None:
    """Each ingredient version tagged with this kitchen's scores, ``kitchen.<metric>``: ``kitchen.heldout`` is
    the scoring part of held-out (the leaderboard's column), beside the trial's own ``heldout_accuracy`` tag on
    the whole held-out split; ``kitchen.run_id`` says which kitchen measured them."""
    model = ingredients_model_name(run.config)
    scores = {c.name: c.scores for c in candidates}
    for ref in refs:
        for metric, value in scores[ref.name].items():
            run.client.set_model_version_tag(model, ref.version, f"kitchen.{metric}", f"{value:.4f}")
        run.client.set_model_version_tag(model, ref.version, "kitchen.run_id", run.run_id)
