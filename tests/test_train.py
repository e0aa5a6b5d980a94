"""Fine-tuning from the offline pretrained start, evaluation on cached splits, and soups of real ingredients."""

from __future__ import annotations

import pytest
import torch

from soups.checkpoint import Ingredient, load_state_dict
from soups.config import FinetuneConfig, TrainConfig, paper_search_space
from soups.evaluate import Evaluator, Preprocess, decoded_split, evaluation_splits
from soups.models import load_classifier
from soups.recipes import cook
from soups.train import EpochReport, finetune, warmup_cosine, zero_shot_classifier


def _config(pretrained, **train) -> FinetuneConfig:
    settings = {"epochs": 3, "lr": 3e-4, "seed": 0, **train}
    return FinetuneConfig.model_validate({"model": {"pretrained": str(pretrained)}, "train": settings})


@pytest.fixture(scope="module")
def two_ingredients(pretrained_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ingredients")
    runs = [
        finetune(_config(pretrained_checkpoint, seed=1), folder / "a.safetensors"),
        finetune(_config(pretrained_checkpoint, seed=2, lr=1e-4, label_smoothing=0.1, randaugment_n=1,
                         randaugment_m=5, mixup_alpha=0.2), folder / "b.safetensors"),
    ]
    return runs


def test_finetuning_improves_over_zero_shot(two_ingredients):
    for run in two_ingredients:
        assert run.metrics["heldout_accuracy"] > run.metrics["zeroshot_heldout_accuracy"], run.metrics
        assert len(run.history) == 3 and run.history[-1].heldout_accuracy == run.metrics["heldout_accuracy"]
        assert run.checkpoint.suffix == ".safetensors" and run.checkpoint.is_file()


def test_training_is_deterministic_on_cpu(pretrained_checkpoint, tmp_path):
    config = _config(pretrained_checkpoint, epochs=1, randaugment_n=2, randaugment_m=9, mixup_alpha=0.4)
    first = load_state_dict(finetune(config, tmp_path / "1.safetensors").checkpoint)
    second = load_state_dict(finetune(config, tmp_path / "2.safetensors").checkpoint)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_epoch_callback_sees_every_epoch_and_can_stop_training(pretrained_checkpoint, tmp_path):
    seen: list[EpochReport] = []

    def stop_after_first(report: EpochReport) -> None:
        seen.append(report)
        raise RuntimeError("pruned")

    with pytest.raises(RuntimeError, match="pruned"):
        finetune(_config(pretrained_checkpoint), tmp_path / "x.safetensors", on_epoch=stop_after_first)
    assert [r.epoch for r in seen] == [1]
    assert not (tmp_path / "x.safetensors").exists(), "a stopped run writes no checkpoint"


def test_checkpoint_reloads_with_identical_outputs(two_ingredients, pretrained_checkpoint):
    run = two_ingredients[0]
    config = _config(pretrained_checkpoint)
    classifier = load_classifier(run.checkpoint, "soups-vit-tiny", num_classes=10)
    preprocess = Preprocess.of(classifier)
    images = preprocess.normalize(decoded_split(config.data, "heldout", preprocess).images[:32])
    reference = zero_shot_classifier(config)
    reference.load_state_dict(load_state_dict(run.checkpoint))
    with torch.inference_mode():
        assert torch.equal(classifier(images), reference.eval()(images))


def test_uniform_soup_of_real_ingredients_is_evaluated(two_ingredients, pretrained_checkpoint):
    config = _config(pretrained_checkpoint)
    classifier = zero_shot_classifier(config)
    preprocess = Preprocess.of(classifier)
    splits, shifts = evaluation_splits(config.data, preprocess)
    assert decoded_split(config.data, "heldout", preprocess) is splits["heldout"], "splits are decoded once"
    evaluator = Evaluator(classifier, splits, preprocess, shifts=shifts)
    ingredients = [Ingredient(run.checkpoint, run.metrics["heldout_accuracy"]) for run in two_ingredients]
    (soup,) = cook("uniform", ingredients)
    rows = {i.name: evaluator.report(load_state_dict(i.path)) for i in ingredients}
    rows["uniform"] = evaluator.report(soup.state_dict)
    for name, row in rows.items():
        print(name, {k: round(v, 3) for k, v in row.items()})
        assert set(row) == {"heldout", "heldout_loss", "test", *shifts, "shift_mean"}
        assert row["shift_mean"] == pytest.approx(sum(row[s] for s in shifts) / len(shifts))
    # Measured, not assumed: the soup of two fine-tunes from one start must at least remain a working model.
    assert rows["uniform"]["test"] > 0.5


def test_paper_search_space_fits_the_training_config():
    for name, distribution in paper_search_space().items():
        assert name in TrainConfig.model_fields
        for bound in (distribution.low, distribution.high):
            TrainConfig.model_validate({name: int(bound) if distribution.kind == "int" else bound})


def test_warmup_cosine_schedule():
    factor = warmup_cosine(10, 110)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.5) and factor(110) == pytest.approx(0.0)


def test_finetune_and_evaluate_on_an_image_folder(pretrained_checkpoint, tmp_path):
    """The real path: class folders of PNG files, a held-out 'val' split and a shift folder."""
    from soups.config import DataConfig
    from soups.data import load_dataset

    digits = load_dataset(DataConfig())
    root = tmp_path / "images"
    splits = {"train": digits.train, "val": digits.heldout, "test": digits.test, "upside-down": digits.test}
    for split, dataset in splits.items():
        for index in range(min(len(dataset), 150)):
            image, label = dataset[index]
            if split == "upside-down":
                image = image.rotate(180)
            folder = root / split / digits.classnames[label]
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{index}.png")
    config = FinetuneConfig.model_validate(
        {"model": {"pretrained": str(pretrained_checkpoint)}, "data": {"name": "imagefolder", "root": str(root)},
         "train": {"epochs": 2, "lr": 3e-4}}
    )
    result = finetune(config, tmp_path / "folder.safetensors")
    assert result.metrics["heldout_accuracy"] > 0.5
    classifier = zero_shot_classifier(config)
    preprocess = Preprocess.of(classifier)
    splits, shifts = evaluation_splits(config.data, preprocess)
    assert shifts == ("upside-down",)
    report = Evaluator(classifier, splits, preprocess, shifts=shifts).report(load_state_dict(result.checkpoint))
    assert report["upside-down"] < report["test"], "rotating digits by 180 degrees should hurt"


def test_every_trial_starts_from_the_same_classifier_even_without_pretrained_weights():
    first = zero_shot_classifier(FinetuneConfig.model_validate({"train": {"seed": 1}}))
    second = zero_shot_classifier(FinetuneConfig.model_validate({"train": {"seed": 2}}))
    assert first is not second, "each caller gets its own copy to train"
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    first.head.weight.data.zero_()
    third = zero_shot_classifier(FinetuneConfig())
    assert not torch.equal(third.head.weight, first.head.weight), "training a copy leaves the shared start alone"
