"""Learned soup, logit ensemble and WiSE-FT on a small real model trained on scikit-learn digits."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from soups.checkpoint import Ingredient, save_state_dict
from soups.recipes import RECIPES, FitSet, RecipeInputs, cook
from soups.recipes import learned as learned_module
from soups.recipes.learned import LearnedOptions, learn_mixing


def _small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 16, 10))


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    return (x[:1200], y[:1200]), (x[1200:], y[1200:])


def _damaged_pool(digits, folder, damaged: int) -> tuple[list[Ingredient], object]:
    """One good ingredient, ``damaged`` damaged ones (heavy noise on every tensor), and the untrained start."""
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
    for k in range(damaged):
        noisy = {key: v + 1.5 * torch.randn(v.shape, generator=g) for key, v in good.items()}
        ingredients.append(Ingredient(save_state_dict(noisy, folder / f"damaged{k}.safetensors"), 0.2, f"bad{k}"))
    return ingredients, start


@pytest.fixture(scope="module")
def pool(digits, tmp_path_factory):
    return _damaged_pool(digits, tmp_path_factory.mktemp("pool"), damaged=2)


def _fit_set(digits) -> FitSet:
    _, (x, y) = digits
    return FitSet(x, y)


def _loss_and_accuracy(state_dict, digits) -> tuple[float, float]:
    model = _small_cnn()
    model.load_state_dict(state_dict)
    _, (x, y) = digits
    with torch.no_grad():
        logits = model(x)
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def test_every_recipe_is_registered():
    assert {"uniform", "greedy", "learned", "learned_by_layer", "ensemble", "wise_ft", "best"} <= set(RECIPES)


def test_learned_soup_favours_the_good_ingredient(digits, pool):
    ingredients, _ = pool
    inputs = RecipeInputs(module=_small_cnn(), fit_batches=_fit_set(digits))
    (uniform,) = cook("uniform", ingredients)
    (learned,) = cook("learned", ingredients, inputs, epochs=20, batch_size=128)
    weights = torch.tensor(learned.details.coefficients)
    assert weights.shape == (3,) and torch.isclose(weights.sum(), torch.tensor(1.0))
    assert weights[0] > 0.6 and weights[0] > weights[1:].max()
    losses = learned.details.losses
    assert losses[-1] < losses[0], "held-out loss drops while learning the mix"
    uniform_loss, _ = _loss_and_accuracy(uniform.state_dict, digits)
    learned_loss, learned_accuracy = _loss_and_accuracy(learned.state_dict, digits)
    assert learned_loss < uniform_loss and learned_accuracy > 0.8


def test_learned_soup_by_layer_has_a_weight_per_ingredient_per_tensor(digits, pool):
    ingredients, _ = pool
    inputs = RecipeInputs(module=_small_cnn(), fit_batches=_fit_set(digits))
    (dish,) = cook("learned_by_layer", ingredients, inputs, epochs=10, batch_size=128, stack_dtype="bfloat16")
    coefficients = {k: torch.tensor(v) for k, v in dish.details.coefficients.items()}
    assert set(coefficients) == set(_small_cnn().state_dict())
    assert all(weights.shape == (3,) for weights in coefficients.values())
    mean_weights = torch.stack(list(coefficients.values())).mean(0)
    assert mean_weights.argmax() == 0, f"the good ingredient should dominate on average: {mean_weights}"
    for key in ("0.weight", "4.weight"):
        assert coefficients[key].argmax() == 0, f"{key}: {coefficients[key]}"
    _, accuracy = _loss_and_accuracy(dish.state_dict, digits)
    assert accuracy > 0.8 and dish.state_dict["4.weight"].dtype == torch.float32


def test_learned_mix_reads_each_checkpoint_once_and_leaves_the_module_alone(digits, pool, monkeypatch):
    ingredients, _ = pool
    opened: list[str] = []
    real_read = learned_module.iter_tensors

    def counting_read(path, *args, **kwargs):
        opened.append(str(path))
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(learned_module, "iter_tensors", counting_read)
    module = _small_cnn()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    mix = learn_mixing(module, [i.path for i in ingredients], _fit_set(digits), LearnedOptions(epochs=2, batch_size=64))
    assert len(mix.losses) == 2 * 10, "2 epochs of 597 images in batches of 64: 10 steps each"
    assert sorted(opened) == sorted(str(i.path) for i in ingredients), "stacked once, not re-read per step"
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), "functional_call must not overwrite the base module's weights"


@pytest.fixture(scope="module")
def pool_of_16(digits, tmp_path_factory):
    ingredients, _ = _damaged_pool(digits, tmp_path_factory.mktemp("pool16"), damaged=15)
    return ingredients


def test_learned_weights_leave_uniform_for_the_clearly_better_ingredient(digits, pool_of_16):
    inputs = RecipeInputs(module=_small_cnn(), fit_batches=_fit_set(digits))
    (dish,) = cook("learned", pool_of_16, inputs, epochs=20, batch_size=128)
    weights = torch.tensor(dish.details.coefficients)
    assert weights[0] > 2 * (1 / 16), f"the good ingredient should end well above uniform: {weights}"
    assert dish.details.epochs == 20 and dish.details.steps == 20 * 5 and dish.details.fit_images == 597
    assert dish.details.final_loss == dish.details.losses[-1]
    assert dish.details.as_json()["epochs"] == 20, "details.json records the budget as epochs"


def test_learned_by_layer_coefficients_differ_between_tensors_and_the_fit_is_reproducible(digits, pool_of_16):
    def fit():
        inputs = RecipeInputs(module=_small_cnn(), fit_batches=_fit_set(digits))
        (dish,) = cook("learned_by_layer", pool_of_16[:4], inputs, epochs=7, batch_size=100, seed=3)
        return {k: torch.tensor(v) for k, v in dish.details.coefficients.items()}

    first, second = fit(), fit()
    rows = torch.stack(list(first.values()))
    assert (rows - rows.mean(0)).abs().max() > 1e-3, "each tensor learns its own mix"
    assert all(torch.equal(first[k], second[k]) for k in first), "same seed, same coefficients"


def test_a_small_fitting_set_gets_one_step_per_epoch_and_stays_near_uniform(digits, pool_of_16):
    """The official budget is 5 epochs of batch 256: on 90 images that is 5 steps, which must not collapse the
    mix onto one ingredient (a 500-step budget did: 0.995 on one trial)."""
    _, (x, y) = digits
    small = FitSet(x[:90], y[:90])
    mix = learn_mixing(_small_cnn(), [i.path for i in pool_of_16], small, LearnedOptions())
    assert len(mix.losses) == 5, "5 epochs, one batch of 90 each"
    assert float(mix.coefficients.max()) < 0.5, f"a few steps stay near uniform (1/16): {mix.coefficients}"
    assert mix.beta != 1.0, "beta, a plain multiplier on the logits, is fitted too"


def test_beta_multiplies_the_logits_plainly(digits, pool):
    """beta starts at 1 and its gradient is the plain one: the first step moves it by AdamW's first step, lr."""
    ingredients, _ = pool
    _, (x, y) = digits
    one_step = LearnedOptions(epochs=1, batch_size=len(y), lr=0.05)
    mix = learn_mixing(_small_cnn(), [i.path for i in ingredients], FitSet(x, y), one_step)
    assert len(mix.losses) == 1 and abs(abs(mix.beta - 1.0) - 0.05) < 1e-4


def test_logit_ensemble_averages_member_logits(digits, pool):
    ingredients, _ = pool
    (dish,) = cook("ensemble", ingredients[:2], RecipeInputs(module=_small_cnn()))
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
    dishes = cook("wise_ft", ingredients, RecipeInputs(base=start), alphas=[0.0, 0.5, 1.0])
    assert [d.details.alpha for d in dishes] == [0.0, 0.5, 1.0]
    from soups.checkpoint import load_state_dict

    zero, tuned = load_state_dict(start), load_state_dict(ingredients[0].path)
    assert torch.allclose(dishes[0].state_dict["4.weight"], zero["4.weight"])
    assert torch.allclose(dishes[2].state_dict["4.weight"], tuned["4.weight"])
    assert torch.allclose(dishes[1].state_dict["4.weight"], (zero["4.weight"] + tuned["4.weight"]) / 2, atol=1e-6)
    assert all(d.ingredients[0].name == "good" for d in dishes)
    with pytest.raises(ValueError, match="needs inputs.base"):
        cook("wise_ft", ingredients)


def test_logit_ensemble_of_half_precision_checkpoints_runs_on_cpu(digits, pool, tmp_path):
    from soups.checkpoint import load_state_dict

    ingredients, _ = pool
    halves = []
    for ingredient in ingredients[:2]:
        half = {k: v.half() for k, v in load_state_dict(ingredient.path).items()}
        halves.append(Ingredient(save_state_dict(half, tmp_path / f"{ingredient.name}.safetensors")))
    (dish,) = cook("ensemble", halves, RecipeInputs(module=_small_cnn()))
    _, (x, _) = digits
    with torch.no_grad():
        assert dish.model(x[:4]).dtype == torch.float32


def _heldout_logits(digits):
    _, (x, _) = digits

    def logits(state_dict):
        model = _small_cnn()
        model.load_state_dict(state_dict)
        with torch.no_grad():
            return model(x)

    return logits


def test_greedy_ensemble_keeps_members_only_while_the_ensemble_holds_up(digits, pool):
    ingredients, _ = pool
    _, (x, y) = digits
    inputs = RecipeInputs(module=_small_cnn(), heldout_logits=_heldout_logits(digits), heldout_labels=y)
    (dish,) = cook("greedy_ensemble", ingredients, inputs)
    trajectory = dish.details.trajectory
    assert [step.ingredient for step in trajectory] == ["good", "bad0", "bad1"], "best first"
    kept = [step.ingredient for step in trajectory if step.accepted]
    assert [i.name for i in dish.ingredients] == kept and kept[0] == "good"
    with torch.no_grad():
        accuracy = float((dish.model(x).argmax(1) == y).float().mean())
    assert accuracy == pytest.approx(dish.details.heldout_score)
    assert accuracy >= trajectory[0].candidate_score, "never worse on held-out than the best member alone"


def test_zero_shot_row_is_the_start_itself(pool):
    ingredients, start = pool
    (dish,) = cook("zero_shot", ingredients, RecipeInputs(base=start))
    from soups.checkpoint import load_state_dict

    assert dish.name == "zero_shot" and dish.ingredients == []
    assert all(torch.equal(v, dish.state_dict[k]) for k, v in load_state_dict(start).items())
