"""The kitchen at a real model size: peak RSS and wall time of `soups import` per checkpoint and of every kitchen
stage (gather, setup, score, each recipe, register), for N ingredients.

Ingredients are random-init fine-tunes of one open_clip start (``--model``, ViT-B-32 by default, built with
pretrained=None: nothing is downloaded) in the paper's released layout (``model.visual.*`` + the leftover text
parameters + ``classification_head.*``, a .pt state dict), each the start plus small noise and its own head.
Images are generated PNGs in an imagefolder (train/ val/ test/). Everything runs offline: MLflow on sqlite and
a local artifact folder under a temporary root; Prefect tasks are called through ``.fn`` (the task bodies, no
server). Each checkpoint is imported, and each stage measured, in a fresh subprocess running the kitchen's own
code (`tasks.importing.import_checkpoints`, `tasks.gathering.gather_ingredients`, `soups.cooking.prepare_cooking`,
`soups.cooking.score_ingredients`, `soups.cooking.cook_and_score`, `tasks.registration.register_candidates`),
with a thread sampling /proc/self/statm every millisecond. ``peak`` is the process' peak resident set (what the
machine must have), ``+stage`` its growth above the level just before the stage (after imports and, for the
stages that need it, the cooking setup), ``anon`` the peak of resident minus file-backed pages (mmap'd
checkpoints are file-backed and reclaimable).

    PYTHONPATH=. .venv/bin/python benchmarks/kitchen_scale.py --n 4 8
    PYTHONPATH=. .venv/bin/python benchmarks/kitchen_scale.py --n 2 3 --model soups-vit-tiny   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

RECIPES = ["uniform", "greedy", "learned_by_layer", "ties", "model_stock", "ensemble", "best"]
PAGE = os.sysconf("SC_PAGE_SIZE")
GB = 1e9


# ------------------------------------------------------------------------------------------------ measuring


def _statm() -> tuple[int, int]:
    """(resident bytes, resident anonymous bytes) of this process."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    resident, shared = int(fields[1]) * PAGE, int(fields[2]) * PAGE
    return resident, resident - shared


class PeakSampler(threading.Thread):
    """Peak resident set (and its anonymous part) from now on, sampled every millisecond."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.base, _ = _statm()
        self.peak, self.peak_anon = _statm()
        self.running = True

    def run(self) -> None:
        while self.running:
            self._sample()
            time.sleep(0.001)

    def _sample(self) -> None:
        resident, anon = _statm()
        self.peak, self.peak_anon = max(self.peak, resident), max(self.peak_anon, anon)

    def stop(self) -> dict[str, float]:
        self.running = False
        self.join()
        self._sample()
        return {"peak_gb": self.peak / GB, "growth_gb": (self.peak - self.base) / GB, "anon_gb": self.peak_anon / GB}


def measured(work) -> dict[str, Any]:
    """Run ``work()`` under a fresh sampler; its seconds and memory."""
    sampler = PeakSampler()
    sampler.start()
    start = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, **sampler.stop(), "result": result}


# ------------------------------------------------------------------------------------------------ the child


def _config(spec: dict[str, Any]):
    from soups.config import load_config

    return load_config(None, spec["overrides"])


def _setup(spec: dict[str, Any]):
    from soups.cooking import prepare_cooking

    return prepare_cooking(_config(spec), Path(spec["workdir"]))


def _refs(spec: dict[str, Any]) -> list:
    from tasks.gathering import IngredientRef

    return [IngredientRef.model_validate(r) for r in json.loads(Path(spec["refs"]).read_text())]


def _scored_ingredients(spec: dict[str, Any]) -> list:
    """The gathered refs as ingredients with the held-out scores the score stage recorded (as `cook_task` does)."""
    from soups.candidates import load_cooked

    scores = {c.name: c.scores for c in load_cooked(Path(spec["workdir"]) / "cooked" / "ingredients.json")}
    return [r.ingredient(scores[r.name]["heldout"], scores[r.name]["heldout_loss"]) for r in _refs(spec)]


def child(mode: str, spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement: preparation first (unmeasured), then the stage under the sampler."""
    import torch  # noqa: F401  (imports are paid before the sampler starts, as the kitchen pays them once)

    from soups.candidates import load_cooked, save_cooked
    from soups.cooking import cook_and_score, score_ingredients
    from tasks.gathering import gather_ingredients
    from tasks.importing import import_checkpoints

    workdir = Path(spec["workdir"])
    if mode == "store":  # the tracking store made before any import is timed (a command makes it once)
        from tasks.adapters.tracking import ensure_experiment

        ensure_experiment(_config(spec))
        return {"seconds": 0.0}
    if mode == "import":
        config = _config(spec)
        return measured(lambda: import_checkpoints(config, [Path(spec["file"])], "model-soups"))
    if mode == "gather":
        config = _config(spec)
        out = measured(lambda: gather_ingredients.fn(config))
        Path(spec["refs"]).write_text(json.dumps([r.model_dump(mode="json") for r in out.pop("result").refs]))
        return out
    if mode == "setup":
        return {**measured(lambda: _setup(spec)), "result": None}
    setup = _setup(spec)
    if mode == "score":
        ingredients = [r.ingredient() for r in _refs(spec)]
        out = measured(lambda: score_ingredients(setup, ingredients))
        save_cooked(workdir / "cooked" / "ingredients.json", out.pop("result"))
        return out
    if mode == "recipe":
        config = _config(spec)
        (choice,) = [c for c in config.kitchen.recipes if c.key == spec["recipe"]]
        ingredients = _scored_ingredients(spec)
        out = measured(lambda: cook_and_score(setup, choice, ingredients, workdir / "soups"))
        save_cooked(workdir / "cooked" / f"recipe-{choice.stored_name}.json", out.pop("result"))
        return out
    if mode == "register":
        return _register(spec, setup, [c for r in sorted(workdir.glob("cooked/recipe-*.json")) for c in load_cooked(r)])
    raise ValueError(f"unknown mode {mode!r}")


def _register(spec: dict[str, Any], setup, candidates: list) -> dict[str, Any]:
    """`register_candidates` under a kitchen run made for it, as the flow's kitchen run would be."""
    from tasks.adapters.tracking import client_for, ensure_experiment
    from tasks.context import RunContext
    from tasks.registration import register_candidates

    config = _config(spec)
    experiment_id = ensure_experiment(config)
    client = client_for(config.tracking)
    run_id = client.create_run(experiment_id, run_name=f"kitchen-bench-{len(_refs(spec))}").info.run_id
    run = RunContext(config, client, experiment_id, run_id, Path(spec["workdir"]))
    out = measured(lambda: register_candidates.fn(run, setup.spec, candidates, _refs(spec)))
    out["result"] = len(out["result"])
    client.set_terminated(run_id)
    return out


# ------------------------------------------------------------------------------------------------ the parent


def make_images(root: Path, classes: int, per_class: int, size: int) -> None:
    """An imagefolder of noise PNGs: ``per_class`` images of each class in train/, val/ and test/."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for label in range(classes):
            folder = root / split / f"class{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")


def make_checkpoints(folder: Path, model_name: str, count: int, classes: int) -> list[Path]:
    """``count`` fine-tunes in the paper's released layout: one random start plus noise, a head each."""
    import torch

    from soups.models import create_clip, model_embed_dim

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clip, _, _, _ = create_clip(model_name)
    start = {f"model.{k}": v for k, v in clip.state_dict().items() if not k.startswith("transformer.")}
    del clip
    paths = []
    for index in range(count):
        g = torch.Generator().manual_seed(index)
        tuned = {
            k: v + 1e-3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in start.items()
        }
        tuned["classification_head.weight"] = torch.randn(classes, model_embed_dim(model_name), generator=g) * 10
        tuned["classification_head.bias"] = torch.zeros(classes)
        path = folder / f"finetune-{index}.pt"
        torch.save(tuned, path)
        paths.append(path)
        del tuned
    return paths


def run_child(mode: str, spec: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "PYTHONPATH": str(Path(__file__).parents[1])}
    result = subprocess.run(
        [sys.executable, __file__, "--child", mode, json.dumps(spec)], capture_output=True, text=True, env=env
    )
    if result.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def row(stage: str, m: dict[str, Any]) -> str:
    return f"{stage:<22} {m['seconds']:8.2f} {m['peak_gb']:8.2f} {m['growth_gb']:8.2f} {m['anon_gb']:8.2f}"


HEADER = f"{'stage':<22} {'seconds':>8} {'peak GB':>8} {'+stage':>8} {'anon GB':>8}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[4, 8], help="ingredient counts (default: 4 8)")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture (default ViT-B-32)")
    parser.add_argument("--recipes", nargs="+", default=RECIPES, help=f"recipes cooked (default: {' '.join(RECIPES)})")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=4, help="images per class and split (default 4)")
    parser.add_argument("--imports-only", action="store_true", help="import max(--n) checkpoints, cook nothing")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        out = child(args.child[0], json.loads(args.child[1]))
        print(json.dumps({k: v for k, v in out.items() if k != "result"}))
        return
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        bench(args, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="soups-kitchen-scale-") as tmp:
            bench(args, Path(tmp))


def bench(args: argparse.Namespace, root: Path) -> None:
    from soups.models import create_clip

    size = create_clip(args.model)[0].visual.image_size[0]
    make_images(root / "images", args.classes, args.per_class, size)
    started = time.perf_counter()
    files = make_checkpoints(root, args.model, max(args.n), args.classes)
    megabytes = files[0].stat().st_size / 1e6
    print(f"wrote {len(files)} {args.model} checkpoints of {megabytes:.0f} MB in {time.perf_counter() - started:.0f}s")
    base = {
        "experiment": "scale",
        "model.name": args.model,
        "pretrain": None,  # random init by choice: the zero-shot base exists (ties, model_stock)
        "data.name": "imagefolder",
        "data.root": str(root / "images"),
        "tracking.root": str(root / "tracking"),
        "kitchen.bootstrap": 0,
        "kitchen.recipes": args.recipes,
    }
    run_child("store", {"overrides": base, "workdir": str(root)})
    print(f"\nimport ({args.model}, paper layout, one process per checkpoint)\n{HEADER}")
    imports = []
    for index, path in enumerate(files):
        spec = {"overrides": base, "workdir": str(root), "file": str(path)}
        imports.append(run_child("import", spec))
        print(row(f"import {index}", imports[-1]), flush=True)
    seconds, peak = sum(m["seconds"] for m in imports) / len(imports), max(m["peak_gb"] for m in imports)
    per_checkpoint = (
        f"import {seconds:.2f}s and peak {peak:.2f} GB (+{max(m['growth_gb'] for m in imports):.2f}) per checkpoint"
    )
    if args.imports_only:
        print(f"\n{len(files)} {args.model} checkpoints of {megabytes:.0f} MB: {per_checkpoint}")
        return
    summaries = []
    for n in args.n:
        workdir = root / f"kitchen-{n}"
        workdir.mkdir()
        overrides = {**base, "kitchen.ingredient_versions": list(range(1, n + 1))}
        spec = {"overrides": overrides, "workdir": str(workdir), "refs": str(workdir / "refs.json")}
        print(f"\nkitchen, N={n}\n{HEADER}")
        stages = {}
        for mode in ("gather", "setup", "score"):
            stages[mode] = run_child(mode, spec)
            print(row(mode, stages[mode]), flush=True)
        for recipe in args.recipes:
            stages[recipe] = run_child("recipe", {**spec, "recipe": recipe})
            print(row(recipe, stages[recipe]), flush=True)
        stages["register"] = run_child("register", spec)
        print(row("register", stages["register"]), flush=True)
        worst = max(stages, key=lambda s: stages[s]["peak_gb"])
        ingredients = n * Path(json.loads((workdir / "refs.json").read_text())[0]["checkpoint"]).stat().st_size / GB
        summaries.append(
            f"N={n} {args.model}: ingredients {ingredients:.2f} GB; kitchen peak {stages[worst]['peak_gb']:.2f} GB "
            f"({worst}); stages {sum(s['seconds'] for s in stages.values()):.1f}s; {per_checkpoint}"
        )
    print()
    print("\n".join(summaries))


if __name__ == "__main__":
    main()
