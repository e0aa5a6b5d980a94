"""What the kitchen holds in memory, checked by its structure (which module runs, which tensors are made, which
file is which), never by timing: scoring streams ingredients into one module, the ensemble runs its members in
that module one at a time, the learned fit holds the ingredients once as its stacks, and a registered soup is a
hard link of the cooked file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from soups.checkpoint import Ingredient, load_state_dict, save_state_dict
from soups.cooking import CookingSetup, score_ingredients
from soups.evaluate import Evaluator
from soups.images import ImageTensors, Preprocess
from soups.recipes import FitSet, RecipeInputs, cook
from soups.recipes.learned import LearnedOptions, learn_mixing

IDENTITY = Preprocess(4, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
CLASSES = 5


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, CLASSES)).eval()


def _ingredients(folder: Path, n: int) -> list[Ingredient]:
    return [
        Ingredient(save_state_dict(_model(seed).state_dict(), folder / f"m{seed}.safetensors"), name=f"m{seed}")
        for seed in range(1, n + 1)
    ]


def _split(seed: int, size: int = 20) -> ImageTensors:
    g = torch.Generator().manual_seed(seed)
    return ImageTensors(
        torch.randint(0, 256, (size, 3, 4, 4), dtype=torch.uint8, generator=g), torch.arange(size) % CLASSES
    )


def _evaluator(module: nn.Module) -> Evaluator:
    return Evaluator(module, {"heldout": _split(0), "test": _split(1)}, IDENTITY, batch_size=8)


def _forwards(module: nn.Module) -> list[int]:
    """A list that grows by one per forward pass of ``module``."""
    calls: list[int] = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_scoring_streams_each_ingredient_into_the_evaluators_one_module(tmp_path):
    ingredients = _ingredients(tmp_path, 3)
    module = _model()
    evaluator = _evaluator(module)
    storages = {k: v.data_ptr() for k, v in module.state_dict().items()}
    calls = _forwards(module)
    candidates = score_ingredients(CookingSetup(evaluator, RecipeInputs(), spec=None), ingredients)
    assert len(calls) == 3 * 2 * 3, "3 ingredients x 2 splits x 3 batches of 8, all in the evaluator's module"
    assert {k: v.data_ptr() for k, v in module.state_dict().items()} == storages, "loaded in place, no new module"
    for ingredient, candidate in zip(ingredients, candidates, strict=True):
        fresh = _model()
        fresh.load_state_dict(load_state_dict(ingredient.path))
        assert candidate.scores == _evaluator(fresh).report().scores


def test_the_ensemble_runs_its_members_one_at_a_time_in_the_one_module(tmp_path):
    ingredients = _ingredients(tmp_path, 3)
    module = _model()
    (dish,) = cook("ensemble", ingredients, RecipeInputs(module=module))
    assert dish.model.module is module, "the kitchen's module, not a copy"
    assert dish.model.members == [i.path for i in ingredients], "members are files, no state dict is held"
    assert sum(t.numel() for t in dish.model.state_dict().values()) == sum(p.numel() for p in module.parameters())
    evaluator = _evaluator(module)
    calls = _forwards(module)
    report = evaluator.report(model=dish.model)
    assert len(calls) == 3 * 2 * 3, "each member run once over each split (3 batches), not per batch"

    data = evaluator.splits["heldout"]
    logits = []
    for ingredient in ingredients:
        fresh = _model()
        fresh.load_state_dict(load_state_dict(ingredient.path))
        with torch.no_grad():
            logits.append(torch.cat([fresh(IDENTITY.normalize(x)) for x, _ in data.batches(8)]))
    mean = (logits[0] + logits[1] + logits[2]) / 3
    assert report.scores["heldout"] == float((mean.argmax(1) == data.labels).float().mean())
    assert report.scores["heldout_loss"] == pytest.approx(float(F.cross_entropy(mean, data.labels)), rel=1e-6)
    per_batch = evaluator.metrics("heldout", dish.model)  # the module's own forward, member by member per batch
    assert (per_batch.accuracy, per_batch.loss) == (report.scores["heldout"], report.scores["heldout_loss"])


class _Made(TorchDispatchMode):
    """Every new tensor an op makes (views and in-place ops left out): its dtype and shape."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[tuple[torch.dtype, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and not func._schema.is_mutable:
            for tensor in out if isinstance(out, tuple | list) else [out]:
                if isinstance(tensor, torch.Tensor):
                    self.made.append((tensor.dtype, tuple(tensor.shape)))
        return out


@pytest.mark.parametrize("stack_dtype", ["bfloat16", "float32"])
def test_the_learned_fit_holds_the_ingredients_once_as_stacks_in_their_dtype(tmp_path, stack_dtype):
    ingredients = _ingredients(tmp_path, 3)
    data = _split(2, size=24)
    fit = FitSet(data.images, data.labels, IDENTITY.normalize)
    options = LearnedOptions(epochs=2, batch_size=8, stack_dtype=stack_dtype)
    stacks = {(3, *v.shape) for v in _model().state_dict().values()}
    with _Made() as mode:
        mix = learn_mixing(_model(), [i.path for i in ingredients], fit, options, by_layer=True)
    assert len(mix.losses) == 6
    stacked = [(dtype, shape) for dtype, shape in mode.made if shape in stacks]
    assert sorted(stacked, key=str) == sorted(((getattr(torch, stack_dtype), s) for s in stacks), key=str), (
        "one [N, ...] tensor per key over 6 steps, made once in the stack dtype: no float32 copy, none per step"
    )


def test_a_registered_soup_is_a_hard_link_of_the_cooked_checkpoint(tmp_path):
    from soups.candidates import Candidate
    from soups.config import load_config
    from soups.models import empty_classifier, save_classifier
    from soups.serving import ClassifierSpec
    from tasks.adapters.packaging import local_folder
    from tasks.adapters.tracking import client_for, ensure_experiment
    from tasks.context import RunContext
    from tasks.registration import register_candidates

    config = load_config(None, {"experiment": "links", "tracking.root": str(tmp_path / "root")})
    experiment_id = ensure_experiment(config)
    client = client_for(config.tracking)
    run = RunContext(config, client, experiment_id, client.create_run(experiment_id).info.run_id, tmp_path / "work")
    classifier = empty_classifier("soups-vit-tiny", 3)
    cooked = save_classifier(classifier, tmp_path / "work" / "soups" / "uniform.safetensors")
    scores = {"heldout": 0.5, "heldout_loss": 1.0, "test": 0.5}
    spec = ClassifierSpec("soups-vit-tiny", ["a", "b", "c"], Preprocess.of(classifier))
    (registered,) = register_candidates.fn(run, spec, [Candidate("uniform", "uniform", ["a"], scores, cooked)], [])
    source = client.get_model_version(config.experiment, registered.version).source
    (stored,) = local_folder(source).rglob("weights.safetensors")
    assert os.stat(stored).st_ino == os.stat(cooked).st_ino, "the store holds the cooked file itself, written once"


def test_an_import_writes_what_a_strict_load_writes_and_digests_it_without_reading_it_back(tmp_path):
    from soups.checkpoint import weights_digest
    from soups.importing import convert, read_checkpoint, to_classifier_state_dict
    from soups.models import classifier_from_state_dict, create_clip

    clip = create_clip("soups-vit-tiny")[0]
    paper = {f"model.{k}": v for k, v in clip.state_dict().items() if not k.startswith("transformer.")}
    paper |= {"classification_head.weight": torch.randn(3, 64), "classification_head.bias": torch.randn(3)}
    torch.save(paper, tmp_path / "paper.pt")
    converted = convert(tmp_path / "paper.pt", "soups-vit-tiny", "auto", tmp_path / "out")
    loaded = classifier_from_state_dict(
        to_classifier_state_dict(read_checkpoint(tmp_path / "paper.pt"), "model-soups"), "soups-vit-tiny"
    )
    written = load_state_dict(converted.path)
    assert sorted(written) == sorted(loaded.state_dict()), "the architecture's keys, no text leftovers"
    assert all(torch.equal(written[k], v) for k, v in loaded.state_dict().items())
    assert converted.weights_sha256 == weights_digest(converted.path)
