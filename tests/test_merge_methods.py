"""Merge methods beyond averaging: each recipe's defining property on small checkpoints, option handling,
greedy with another recipe as its combine step, and proof that every recipe reads one key at a time."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from soups.checkpoint import Ingredient, NonFiniteTensorError, save_state_dict
from soups.config import RecipeChoice
from soups.recipes import RecipeInputs, cook, recipe_options
from soups.recipes import task_vectors as task_vectors_module
from soups.recipes.dare import drop_generator
from soups.recipes.ties import trim
from soups.tensorfile import READERS, read_ahead
from tests.helpers import random_state_dict, write_ingredients


def _write(folder, name: str, tensors: dict[str, torch.Tensor], score: float | None = None) -> Ingredient:
    return Ingredient(save_state_dict(tensors, folder / f"{name}.safetensors"), score, name)


def _pool(folder, n: int = 3, dtype: torch.dtype = torch.float32) -> tuple[list[Ingredient], RecipeInputs]:
    """n scored random ingredients and a random zero-shot base of the same layout."""
    written = write_ingredients(folder, list(range(1, n + 1)), dtype)
    ingredients = [Ingredient(i.path, 0.5 + 0.1 * k) for k, i in enumerate(written)]
    base = save_state_dict(random_state_dict(0, dtype), folder / "base.safetensors")
    return ingredients, RecipeInputs(base=base)


def _vectors(folder, base: list[float], deltas: list[list[float]]) -> tuple[list[Ingredient], RecipeInputs]:
    """One-tensor checkpoints: base θ₀ = ``base`` and ingredient i = θ₀ + deltas[i]."""
    theta0 = torch.tensor(base)
    ingredients = [_write(folder, f"m{i}", {"w": theta0 + torch.tensor(d)}, 1 - i / 10) for i, d in enumerate(deltas)]
    return ingredients, RecipeInputs(base=_write(folder, "base", {"w": theta0}).path)


def _w(name: str, ingredients: list[Ingredient], inputs: RecipeInputs, **options) -> torch.Tensor:
    (dish,) = cook(name, ingredients, inputs, **options)
    return dish.state_dict["w"]


def test_options_and_inputs_are_checked(tmp_path):
    ingredients, inputs = _pool(tmp_path)
    with pytest.raises(ValueError, match=r"densty.*allowed options: density"):
        cook("ties", ingredients, inputs, densty=0.1)
    for name in ("task_arithmetic", "ties", "dare", "model_stock"):
        with pytest.raises(ValueError, match="needs inputs.base"):
            cook(name, ingredients, RecipeInputs())
    nan, inputs = _vectors(tmp_path, [0.0, 0.0], [[1.0, 2.0], [float("nan"), 1.0]])
    with pytest.raises(NonFiniteTensorError, match="m1"):
        cook("ties", nan, inputs)


def test_lambda_is_set_by_its_name_and_a_dump_validates_again(tmp_path):
    options = recipe_options("task_arithmetic", {"lambda": 0.5})
    assert options.lambda_ == 0.5 and options.model_dump(mode="json") == {"lambda": 0.5}
    assert recipe_options("task_arithmetic", options.model_dump(mode="json")) == options
    choice = RecipeChoice.model_validate({"name": "ties", "options": {"lambda": 0.7}})
    assert choice.options == {"density": 0.2, "lambda": 0.7}
    assert RecipeChoice.model_validate(choice.model_dump(mode="json")) == choice
    ingredients, inputs = _pool(tmp_path)
    assert cook("task_arithmetic", ingredients, inputs, **{"lambda": 0.5})[0].details.lambda_ == 0.5


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-6), (torch.float16, 2e-3)])
def test_task_arithmetic_with_lambda_one_over_n_is_the_uniform_soup(tmp_path, dtype, tolerance):
    ingredients, inputs = _pool(tmp_path, n=4, dtype=dtype)
    (soup,) = cook("task_arithmetic", ingredients, inputs, **{"lambda": 0.25})
    (uniform,) = cook("uniform", ingredients, dtype="float32")
    assert torch.equal(soup.state_dict["counter"], torch.tensor([1])), "non-floating tensors: the first ingredient's"
    for key in ("layer.weight", "layer.bias", "norm.scale"):
        assert soup.state_dict[key].dtype == dtype, "the soup keeps the ingredients' dtype"
        torch.testing.assert_close(soup.state_dict[key].float(), uniform.state_dict[key], atol=tolerance, rtol=0)


def test_ties_entries_against_the_elected_sign_never_count(tmp_path):
    # entry 0: +3, +2, -1 -> elected +, disjoint mean 2.5; entry 1: -3, +1, +1 -> elected -, only -3 counts
    deltas = [[3.0, -3.0], [2.0, 1.0], [-1.0, 1.0]]
    ingredients, inputs = _vectors(tmp_path / "a", [1.0, 1.0], deltas)
    merged = _w("ties", ingredients, inputs, density=1.0)
    torch.testing.assert_close(merged, torch.tensor([1.0 + 2.5, 1.0 - 3.0]))
    deltas[2] = [-4.0, 1.9]  # bigger disagreeing entries that do not flip the elected signs
    ingredients, inputs = _vectors(tmp_path / "b", [1.0, 1.0], deltas)
    assert torch.equal(_w("ties", ingredients, inputs, density=1.0), merged)
    assert torch.equal(_w("ties", ingredients, inputs, density=1.0, **{"lambda": 0.5}), torch.tensor([2.25, -0.5]))


def test_ties_keeps_each_task_vectors_top_density_fraction(tmp_path):
    ingredients, inputs = _vectors(tmp_path, [0.0] * 5, [[0.1, -5.0, 0.3, 2.0, -0.2]])
    assert torch.equal(_w("ties", ingredients, inputs, density=0.4), torch.tensor([0.0, -5.0, 0.0, 2.0, 0.0]))
    delta = torch.randn(7, 9, generator=torch.Generator().manual_seed(0))
    k = int(0.2 * delta.numel())
    top = delta.abs() >= delta.abs().flatten().kthvalue(delta.numel() - k + 1).values  # no equal magnitudes here
    assert torch.equal(trim(delta, 0.2), delta * top) and int(top.sum()) == k


def test_dare_is_seeded_and_independent_of_the_other_keys(tmp_path):
    ingredients, inputs = _pool(tmp_path)
    (one,) = cook("dare", ingredients, inputs, seed=3)
    (again,) = cook("dare", ingredients, inputs, seed=3)
    (other,) = cook("dare", ingredients, inputs, seed=4)
    assert all(torch.equal(one.state_dict[k], again.state_dict[k]) for k in one.state_dict)
    assert not torch.equal(one.state_dict["layer.weight"], other.state_dict["layer.weight"])
    weight = {k: {"layer.weight": random_state_dict(k)["layer.weight"]} for k in range(4)}  # seed 0 is the base
    alone = [_write(tmp_path, f"alone{k}", weight[k]) for k in range(1, 4)]
    base = _write(tmp_path, "alone_base", weight[0]).path
    (single,) = cook("dare", alone, RecipeInputs(base=base), seed=3)
    assert torch.equal(single.state_dict["layer.weight"], one.state_dict["layer.weight"])


def test_dare_keeps_the_task_vector_in_expectation(tmp_path):
    tau = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    ingredients, inputs = _vectors(tmp_path, [0.0] * tau.numel(), [tau.tolist()])
    dropped = _w("dare", ingredients, inputs, p=0.5, **{"lambda": 1.0})
    kept = dropped != 0
    assert abs(float(kept.float().mean()) - 0.5) < 0.01  # 0.5 ± 0.0011 (1 sigma)
    torch.testing.assert_close(dropped[kept], 2 * tau[kept])  # survivors rescaled by 1/(1-p)
    slope = float(dropped @ tau / (tau @ tau))
    assert abs(slope - 1) < 0.02  # E[DARE(τ)] = τ: regression slope 1 ± 0.004 (1 sigma)
    assert drop_generator(0, 0, "w").initial_seed() != drop_generator(0, 1, "w").initial_seed()


def test_dare_without_drops_is_task_arithmetic_or_ties(tmp_path):
    ingredients, inputs = _pool(tmp_path)
    for combine, recipe, trim_options in (("linear", "task_arithmetic", {}), ("ties", "ties", {"density": 0.2})):
        (dare,) = cook("dare", ingredients, inputs, p=0.0, combine=combine, **trim_options)
        (reference,) = cook(recipe, ingredients, inputs)
        assert dare.name == f"dare_{combine}"
        assert all(torch.equal(dare.state_dict[k], reference.state_dict[k]) for k in reference.state_dict)
    with pytest.raises(ValueError, match="density trims for combine='ties'"):
        cook("dare", ingredients, inputs, density=0.2)


def test_model_stock_interpolates_by_the_agreement_of_the_task_vectors(tmp_path):
    orthogonal = [[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, -3.0, 1.0]]
    ingredients, inputs = _vectors(tmp_path / "a", [1.0, 2.0, 3.0, 4.0], orthogonal)
    (dish,) = cook("model_stock", ingredients, inputs)
    assert dish.details.t == {"w": 0.0} and torch.equal(dish.state_dict["w"], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    ingredients, inputs = _vectors(tmp_path / "b", [1.0, 2.0, 3.0], [[0.5, -1.0, 2.0]] * 3)  # identical
    (dish,) = cook("model_stock", ingredients, inputs)
    assert dish.details.t["w"] == pytest.approx(1.0)
    torch.testing.assert_close(dish.state_dict["w"], torch.tensor([1.5, 1.0, 5.0]))
    # two at 60°: cos = 0.5, t = 2·0.5 / (1 + 0.5) = 2/3
    ingredients, inputs = _vectors(tmp_path / "c", [0.0, 0.0], [[1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    assert cook("model_stock", ingredients, inputs)[0].details.t["w"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="at least 2"):
        cook("model_stock", ingredients[:1], inputs)


def test_slerp_endpoints_colinear_and_norm(tmp_path):
    ingredients, inputs = _vectors(tmp_path / "ortho", [0.0, 0.0], [[1.0, 0.0], [0.0, 1.0]])
    assert torch.equal(_w("slerp", ingredients, inputs, t=0.0), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(_w("slerp", ingredients, inputs, t=1.0), torch.tensor([0.0, 1.0]))
    for t in (0.3, 0.5):
        mid = _w("slerp", ingredients, inputs, t=t)
        assert float(mid.norm()) == pytest.approx(1.0)  # linear interpolation would give sqrt(0.58), sqrt(0.5)
        torch.testing.assert_close(mid, torch.tensor([math.cos(t * math.pi / 2), math.sin(t * math.pi / 2)]))
    ingredients, inputs = _vectors(tmp_path / "colinear", [0.0, 0.0], [[1.0, 2.0], [2.0, 4.0]])
    torch.testing.assert_close(_w("slerp", ingredients, inputs, t=0.25), torch.tensor([1.25, 2.5]))


def test_slerp_of_many_runs_from_the_best_ingredient_to_the_uniform_soup(tmp_path):
    ingredients, inputs = _pool(tmp_path, n=3)  # scores 0.5, 0.6, 0.7: the last is best
    (start,) = cook("slerp", ingredients, inputs, t=0.0)
    (end,) = cook("slerp", ingredients, inputs, t=1.0)
    (uniform,) = cook("uniform", ingredients)
    assert start.details.endpoints == [ingredients[2].name, "uniform"]
    assert torch.equal(start.state_dict["layer.weight"], random_state_dict(3)["layer.weight"])
    torch.testing.assert_close(end.state_dict["layer.weight"], uniform.state_dict["layer.weight"])


def test_greedy_combines_with_ties_through_the_registry(tmp_path):
    ingredients, inputs = _pool(tmp_path)
    best = max(i.score for i in ingredients)
    inputs.evaluate = lambda state_dict: best  # every candidate ties with the best: '>=' keeps all, '>' none
    (dish,) = cook("greedy", ingredients, inputs, combine="ties", combine_options={"density": 0.5})
    assert dish.name == "greedy_ties" and dish.recipe == "greedy"
    assert dish.details.combine == "ties" and dish.details.combine_options == {"density": 0.5, "lambda": 1.0}
    assert [s.ingredient for s in dish.details.trajectory] == [i.name for i in reversed(ingredients)]
    (ties,) = cook("ties", dish.ingredients, inputs, density=0.5)  # best first, as accepted
    assert all(torch.equal(dish.state_dict[k], ties.state_dict[k]) for k in ties.state_dict)
    (strict,) = cook("greedy", ingredients, inputs, combine="ties", strict=True)
    assert [i.name for i in strict.ingredients] == [ingredients[2].name]


def test_greedy_combine_is_checked_against_the_registry():
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        recipe_options("greedy", {"combine": "nope"})
    with pytest.raises(ValueError, match="itself"):
        recipe_options("greedy", {"combine": "greedy"})
    with pytest.raises(ValueError, match="densty"):
        recipe_options("greedy", {"combine": "ties", "combine_options": {"densty": 0.1}})
    with pytest.raises(ValueError, match="running mean"):
        recipe_options("greedy", {"combine_options": {"dtype": "float16"}})


@pytest.mark.parametrize("recipe", ["task_arithmetic", "ties", "dare", "model_stock", "slerp"])
def test_recipes_read_key_after_key_into_a_few_buffers_used_in_turn(tmp_path, monkeypatch, recipe):
    keys, n = 12, 3
    g = torch.Generator().manual_seed(0)
    files = [
        _write(tmp_path, f"f{i}", {f"k{k}": torch.randn(8, 4, generator=g) for k in range(keys)}, 0.5 + i / 10)
        for i in range(n + 1)
    ]
    ingredients, inputs = files[:n], RecipeInputs(base=files[n].path)
    used: dict[str, int] = {}
    read_key = task_vectors_module._read_key

    def recording_read_key(key: str, readers: list, n: int, buffer: torch.Tensor) -> torch.Tensor:
        rows = read_key(key, readers, n, buffer)
        used[key] = rows.untyped_storage().data_ptr()
        return rows

    monkeypatch.setattr(task_vectors_module, "_read_key", recording_read_key)
    (dish,) = cook(recipe, ingredients, inputs)
    buffers = [used[key] for key in sorted(used)]  # the order the jobs were given in: the files' key order
    assert len(buffers) == keys, "every key is read once, all its files at once"
    turn = READERS + 1
    assert len(set(buffers)) == turn and buffers == [buffers[i % turn] for i in range(keys)], "buffers in turn"
    assert not {t.untyped_storage().data_ptr() for t in dish.state_dict.values()} & set(buffers)
    distinct = {tuple(t.flatten().tolist()) for t in dish.state_dict.values()}
    assert len(distinct) == keys, "no key's result was overwritten by a later key's read"


def test_read_ahead_runs_at_most_ahead_jobs_ahead_and_raises_where_the_failed_result_was_due():
    started: list[int] = []

    def job(index: int) -> int:
        started.append(index)
        if index == 3:
            raise ValueError("job 3 failed")
        return index

    for ahead in (1, 2):
        started.clear()
        received = []
        with pytest.raises(ValueError, match="job 3 failed"):
            for value in read_ahead([functools.partial(job, i) for i in range(6)], ahead):
                assert value + ahead + 1 not in started, "never more than `ahead` jobs past the caller"
                received.append(value)
        assert received == [0, 1, 2] and 3 + ahead not in started
