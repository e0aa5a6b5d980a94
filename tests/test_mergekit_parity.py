"""The merge recipes against mergekit (run from its own venv) on the same tiny checkpoints: same tensors to
float32 rounding. The venv is built by `bash benchmarks/mergekit_venv.sh` (`make mergekit`); CI must have it."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from benchmarks.mergekit_peer import mergekit_config, mergekit_python, run_mergekit, write_config
from soups.checkpoint import Ingredient, save_state_dict
from soups.recipes import RecipeInputs, cook

SHAPES = {"embed.weight": (24, 16), "block.weight": (16, 16), "block.bias": (16,), "conv.weight": (4, 3, 3, 3)}
CASES = [
    ("task_arithmetic", {"lambda": 0.3}),
    ("task_arithmetic", {"lambda": 1.0}),
    ("ties", {"density": 0.2, "lambda": 1.0}),
    ("ties", {"density": 0.5, "lambda": 0.7}),
    ("model_stock", {}),
    ("slerp", {"t": 0.3}),
]


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """The pool (3 fine-tunes of a shared base, correlated task vectors) and mergekit's output for each case."""
    python = mergekit_python()
    if python is None:
        message = "mergekit venv missing: run `make mergekit` (bash benchmarks/mergekit_venv.sh)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    folder = tmp_path_factory.mktemp("parity")
    g = torch.Generator().manual_seed(0)
    base = {key: torch.randn(shape, generator=g) for key, shape in SHAPES.items()}
    shared = {key: torch.randn(shape, generator=g) for key, shape in SHAPES.items()}
    paths = [
        save_state_dict(
            {k: base[k] + 0.05 * (shared[k] + torch.randn(SHAPES[k], generator=g)) for k in SHAPES},
            folder / f"finetune{i}.safetensors",
        )
        for i in range(3)
    ]
    base_path = save_state_dict(base, folder / "base.safetensors")
    jobs = [
        (
            write_config(mergekit_config(recipe, _inputs(recipe, paths), base_path, options), folder / f"{n}.yml"),
            folder / f"out{n}",
        )
        for n, (recipe, options) in enumerate(CASES)
    ]
    return paths, base_path, run_mergekit(python, jobs)


def _inputs(recipe: str, paths: list) -> list:
    return paths[:2] if recipe == "slerp" else paths  # SLERP: first -> second


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{r}-{o}" for r, o in CASES])
def test_same_tensors_as_mergekit(merged, case):
    paths, base, outputs = merged
    recipe, options = CASES[case]
    (dish,) = cook(recipe, [Ingredient(p) for p in _inputs(recipe, paths)], RecipeInputs(base=base), **options)
    theirs = load_file(str(outputs[case]))
    assert set(theirs) == set(dish.state_dict)
    for key, value in dish.state_dict.items():
        assert theirs[key].dtype == value.dtype
        torch.testing.assert_close(value, theirs[key], atol=1e-6, rtol=0, msg=lambda m, key=key: f"{key}: {m}")
