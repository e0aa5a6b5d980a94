"""Learned soup, logit ensemble and WiSE-FT on a small real model trained on scikit-learn digits."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from soups.checkpoint import Ingredient, save_state_dict
from soups.recipes import Kitchen, cook, recipe_names
from soups.recipes.learned import learn_mixing


def _small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 16, 10)
    )


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    return (x[:1200], y[:1200]), (x[1200:], y[1200:])


@pytest.fixture(scope="module")
def pool(digits, tmp_path_factory):
    """One good ingredient, two damaged ones (heavy noise on every tensor), and the untrained start."""
    folder = tmp_path_factory.mktemp("pool")
    (x, y), _ = digits
    torch.manual_seed(0)
    model = _small_cnn()
    start = save_state_dict(model.state_dict(), folder / "start.safetensors")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    good = model.state_dict()
    ingredients = [Ingredient(save_state_dict(good, folder / "good.safetensors"), 0.95, "good")]
    g = torch.Generator().manual_seed(1)
    for k in range(2):
        damaged = {key: v + 1.5 * torch.randn(v.shape, generator=g) for key, v in good.items()}
        ingredients.append(
            Ingredient(save_state_dict(damaged, folder / f"damaged{k}.safetensors"), 0.2, f"bad{k}")
        )
    return ingredients, start


def _heldout_batches(digits, size=128):
    _, (x, y) = digits
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def _loss_and_accuracy(state_dict, digits) -> tuple[float, float]:
    model = _small_cnn()
    model.load_state_dict(state_dict)
    _, (x, y) = digits
    with torch.no_grad():
        logits = model(x)
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def test_every_recipe_is_registered():
    assert {"uniform", "greedy", "learned", "learned_by_layer", "ensemble", "wise_ft", "best"} <= set(
        recipe_names()
    )


def test_learned_soup_favours_the_good_ingredient(digits, pool):
    ingredients, _ = pool
    kitchen = Kitchen(module=_small_cnn(), heldout=_heldout_batches(digits))
    (uniform,) = cook("uniform", ingredients)
    (learned,) = cook("learned", ingredients, kitchen, epochs=10)
    weights = learned.details["coefficients"]
    assert weights.shape == (3,) and torch.isclose(weights.sum(), torch.tensor(1.0))
    assert weights[0] > 0.6 and weights[0] > weights[1:].max()
    losses = learned.details["losses"]
    assert losses[-1] < losses[0], "held-out loss drops while learning the mix"
    uniform_loss, _ = _loss_and_accuracy(uniform.state_dict, digits)
    learned_loss, learned_accuracy = _loss_and_accuracy(learned.state_dict, digits)
    assert learned_loss < uniform_loss and learned_accuracy > 0.8


def test_learned_soup_by_layer_has_a_weight_per_ingredient_per_tensor(digits, pool):
    ingredients, _ = pool
    kitchen = Kitchen(module=_small_cnn(), heldout=_heldout_batches(digits))
    (dish,) = cook("learned_by_layer", ingredients, kitchen, epochs=10, stack_dtype=torch.bfloat16)
    coefficients = dish.details["coefficients"]
    assert set(coefficients) == set(_small_cnn().state_dict())
    assert all(weights.shape == (3,) for weights in coefficients.values())
    mean_weights = torch.stack(list(coefficients.values())).mean(0)
    assert mean_weights.argmax() == 0, f"the good ingredient should dominate on average: {mean_weights}"
    for key in ("0.weight", "4.weight"):
        assert coefficients[key].argmax() == 0, f"{key}: {coefficients[key]}"
    _, accuracy = _loss_and_accuracy(dish.state_dict, digits)
    assert accuracy > 0.8 and dish.state_dict["4.weight"].dtype == torch.float32


def test_learned_mix_stacks_once_and_reuses_the_module(digits, pool):
    ingredients, _ = pool
    module = _small_cnn()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    mix = learn_mixing(module, [i.path for i in ingredients], _heldout_batches(digits), epochs=1)
    assert len(mix.losses) == len(_heldout_batches(digits))
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), "functional_call must not overwrite the base module's weights"


def test_logit_ensemble_averages_member_logits(digits, pool):
    ingredients, _ = pool
    (dish,) = cook("ensemble", ingredients[:2], Kitchen(module=_small_cnn()))
    _, (x, _) = digits
    members = []
    for ingredient in ingredients[:2]:
        model = _small_cnn()
        from soups.checkpoint import load_state_dict

        model.load_state_dict(load_state_dict(ingredient.path))
        members.append(model(x[:16]))
    with torch.no_grad():
        assert torch.allclose(dish.model(x[:16]), (members[0] + members[1]) / 2, atol=1e-5)


def test_wise_ft_interpolates_between_zero_shot_and_best(digits, pool):
    ingredients, start = pool
    dishes = cook("wise_ft", ingredients, Kitchen(base=start), alphas=[0.0, 0.5, 1.0])
    assert [d.details["alpha"] for d in dishes] == [0.0, 0.5, 1.0]
    from soups.checkpoint import load_state_dict

    zero, tuned = load_state_dict(start), load_state_dict(ingredients[0].path)
    assert torch.allclose(dishes[0].state_dict["4.weight"], zero["4.weight"])
    assert torch.allclose(dishes[2].state_dict["4.weight"], tuned["4.weight"])
    assert torch.allclose(
        dishes[1].state_dict["4.weight"], (zero["4.weight"] + tuned["4.weight"]) / 2, atol=1e-6
    )
    assert all(d.ingredients[0].name == "good" for d in dishes)
    with pytest.raises(ValueError, match="needs kitchen.base"):
        cook("wise_ft", ingredients)


def test_logit_ensemble_of_half_precision_checkpoints_runs_on_cpu(digits, pool, tmp_path):
    from soups.checkpoint import load_state_dict

    ingredients, _ = pool
    halves = []
    for ingredient in ingredients[:2]:
        half = {k: v.half() for k, v in load_state_dict(ingredient.path).items()}
        halves.append(Ingredient(save_state_dict(half, tmp_path / f"{ingredient.name}.safetensors")))
    (dish,) = cook("ensemble", halves, Kitchen(module=_small_cnn()))
    _, (x, _) = digits
    with torch.no_grad():
        assert dish.model(x[:4]).dtype == torch.float32
