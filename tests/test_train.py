"""Fine-tuning from the offline pretrained start, evaluation on cached splits, and soups of real ingredients."""

from __future__ import annotations

import copy
import os
import random
import threading
import time

import numpy as np
import pytest
import torch

from soups.checkpoint import Ingredient, file_sha256, load_state_dict
from soups.config import DataConfig, FinetuneConfig, ModelConfig, TrainConfig, paper_search_space
from soups.data import load_dataset
from soups.evaluate import Evaluator, evaluation_splits
from soups.models import load_classifier
from soups.recipes import cook
from soups.runtime import use_determinism
from soups.train import EpochReport, finetune, prepare_finetune, warmup_cosine, zero_shot_start


def _config(pretrained, **train) -> FinetuneConfig:
    settings = {"epochs": 3, "lr": 3e-4, "seed": 0, **train}
    return FinetuneConfig.model_validate({"model": {"pretrained": str(pretrained)}, "train": settings})


@pytest.fixture(scope="module")
def inputs(pretrained_checkpoint):
    """The shared start and decoded splits, prepared once for every fine-tune of this module."""
    config = _config(pretrained_checkpoint)
    return prepare_finetune(config)


@pytest.fixture(scope="module")
def two_ingredients(pretrained_checkpoint, inputs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ingredients")
    runs = [
        finetune(_config(pretrained_checkpoint, seed=1), inputs, folder / "a.safetensors"),
        finetune(
            _config(
                pretrained_checkpoint,
                seed=2,
                lr=1e-4,
                label_smoothing=0.1,
                randaugment_n=1,
                randaugment_m=5,
                mixup_alpha=0.2,
            ),
            inputs,
            folder / "b.safetensors",
        ),
    ]
    return runs


def test_finetuning_improves_over_zero_shot(two_ingredients):
    for run in two_ingredients:
        assert run.metrics["heldout_accuracy"] > run.metrics["zeroshot_heldout_accuracy"], run.metrics
        assert len(run.history) == 3 and run.history[-1].heldout_accuracy == run.metrics["heldout_accuracy"]
        assert run.checkpoint.suffix == ".safetensors" and run.checkpoint.is_file()


def _drawing_from_global_generators(stop: threading.Event) -> None:
    """What a sweep's other threads do meanwhile: Prefect's websocket client masks every frame with
    random.getrandbits, coolname names runs with random.randrange; anything may call torch.rand."""
    while not stop.is_set():
        random.getrandbits(32)
        np.random.random()
        torch.rand(1)
        time.sleep(0.0005)


def test_training_is_bit_identical_while_other_threads_draw_from_the_global_generators(
    pretrained_checkpoint, inputs, tmp_path
):
    config = _config(pretrained_checkpoint, epochs=1, randaugment_n=2, randaugment_m=9, mixup_alpha=0.4)
    quiet = finetune(config, inputs, tmp_path / "quiet.safetensors")
    stop = threading.Event()
    noise = threading.Thread(target=_drawing_from_global_generators, args=(stop,))
    noise.start()
    try:
        busy = finetune(config, inputs, tmp_path / "busy.safetensors")
    finally:
        stop.set()
        noise.join()
    assert file_sha256(quiet.checkpoint) == file_sha256(busy.checkpoint), "same file, byte for byte"
    assert quiet.metrics["heldout_accuracy"] == busy.metrics["heldout_accuracy"]
    assert quiet.runtime == busy.runtime
    assert quiet.runtime["torch_threads"] == str(torch.get_num_threads()) and quiet.runtime["timm"]


def test_deterministic_mode_turns_on_pytorchs_deterministic_algorithms_and_the_cublas_setting(
    pretrained_checkpoint, inputs, tmp_path, monkeypatch
):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    config = _config(pretrained_checkpoint, epochs=1, deterministic=True)
    try:
        run = finetune(config, inputs, tmp_path / "deterministic.safetensors")
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert run.runtime["deterministic"] == "True"
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
        with pytest.raises(ValueError, match="CUBLAS_WORKSPACE_CONFIG :4096:8 or :16:8"):
            finetune(config, inputs, tmp_path / "refused.safetensors")
    finally:
        use_determinism(False)
    assert not torch.are_deterministic_algorithms_enabled()


def test_epoch_callback_sees_every_epoch_and_can_stop_training(pretrained_checkpoint, inputs, tmp_path):
    seen: list[EpochReport] = []

    def stop_after_first(report: EpochReport) -> None:
        seen.append(report)
        raise RuntimeError("pruned")

    with pytest.raises(RuntimeError, match="pruned"):
        finetune(_config(pretrained_checkpoint), inputs, tmp_path / "x.safetensors", on_epoch=stop_after_first)
    assert [r.epoch for r in seen] == [1]
    assert not (tmp_path / "x.safetensors").exists(), "a stopped run writes no checkpoint"


def test_checkpoint_reloads_with_identical_outputs(two_ingredients, inputs):
    run = two_ingredients[0]
    classifier = load_classifier(run.checkpoint, "soups-vit-tiny", num_classes=10)
    images = inputs.preprocess.normalize(inputs.heldout.images[:32])
    reference = copy.deepcopy(inputs.start)
    reference.load_state_dict(load_state_dict(run.checkpoint))
    with torch.inference_mode():
        assert torch.equal(classifier(images), reference.eval()(images))


def test_uniform_soup_of_real_ingredients_is_evaluated(two_ingredients, inputs):
    splits, shifts = evaluation_splits(load_dataset(inputs.data), inputs.preprocess)
    evaluator = Evaluator(copy.deepcopy(inputs.start), splits, inputs.preprocess, shifts=shifts)
    ingredients = [Ingredient(run.checkpoint, run.metrics["heldout_accuracy"]) for run in two_ingredients]
    (soup,) = cook("uniform", ingredients)
    rows = {i.name: evaluator.report(load_state_dict(i.path)).scores for i in ingredients}
    rows["uniform"] = evaluator.report(soup.state_dict).scores
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
        {
            "model": {"pretrained": str(pretrained_checkpoint)},
            "data": {"name": "imagefolder", "root": str(root)},
            "train": {"epochs": 2, "lr": 3e-4},
        }
    )
    folder_inputs = prepare_finetune(config)
    result = finetune(config, folder_inputs, tmp_path / "folder.safetensors")
    assert result.metrics["heldout_accuracy"] > 0.5
    splits, shifts = evaluation_splits(load_dataset(config.data), folder_inputs.preprocess)
    assert shifts == ("upside-down",)
    evaluator = Evaluator(folder_inputs.start, splits, folder_inputs.preprocess, shifts=shifts)
    report = evaluator.report(load_state_dict(result.checkpoint)).scores
    assert report["upside-down"] < report["test"], "rotating digits by 180 degrees should hurt"


def test_every_trial_starts_from_the_same_classifier_even_without_pretrained_weights():
    bundle = load_dataset(DataConfig())
    torch.manual_seed(1)
    first = zero_shot_start(ModelConfig(), bundle)
    torch.manual_seed(2)
    second = zero_shot_start(ModelConfig(), bundle)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key


def test_finetuning_trains_a_copy_and_leaves_the_shared_start_alone(pretrained_checkpoint, inputs, tmp_path):
    before = {k: v.clone() for k, v in inputs.start.state_dict().items()}
    finetune(_config(pretrained_checkpoint, epochs=1, lr=1e-3), inputs, tmp_path / "c.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in inputs.start.state_dict().items())


def test_inputs_prepared_for_another_dataset_are_refused(pretrained_checkpoint, inputs, tmp_path):
    other = _config(pretrained_checkpoint).model_copy(update={"data": DataConfig(seed=1)})
    with pytest.raises(ValueError, match="another model or dataset"):
        finetune(other, inputs, tmp_path / "o.safetensors")


def test_randaugment_is_timms_transform_as_the_paper_named_it(inputs):
    import random as python_random

    import numpy as np
    from timm.data import rand_augment_transform
    from timm.data.auto_augment import RandAugment
    from torchvision.transforms import v2

    from soups.train_input import randaugment_transform, train_transform

    transform = randaugment_transform(10, 2, inputs.preprocess)
    assert isinstance(transform, RandAugment) and transform.num_layers == 2
    assert all(op.prob == 0.5 and op.magnitude == 10 for op in transform.ops)
    hparams = {"translate_const": int(inputs.preprocess.size * 0.45), "img_mean": (123, 117, 104)}
    reference = rand_augment_transform("rand-m10-n2", hparams)
    image = v2.functional.to_pil_image(inputs.train.decoded.images[0])

    def drawn(augment):
        python_random.seed(7)
        np.random.seed(7)
        return v2.functional.pil_to_tensor(augment(image))

    expected = drawn(reference)
    assert torch.equal(drawn(transform), expected), "the same draws give the same image as timm's own transform"
    assert torch.equal(drawn(randaugment_transform(20, 2, inputs.preprocess)), expected), "M > 10 is clipped to 10"
    assert train_transform(inputs.preprocess, TrainConfig()) is None, "no augmentation: decode as for evaluation"
    assert isinstance(train_transform(inputs.preprocess, TrainConfig(randaugment_n=2)).transforms[1], RandAugment)
