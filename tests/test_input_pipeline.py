"""Training and evaluation read from memory when a split fits its budget and stream with workers when it does
not; with augmentation off both give the same batches, the same model and the same scores."""

from __future__ import annotations

import pytest
import torch

from soups.config import DataConfig, FinetuneConfig, TrainConfig
from soups.data import load_dataset
from soups.evaluate import Evaluator, evaluation_splits
from soups.images import ImageTensors, StreamedImages, decode
from soups.train import finetune, prepare_finetune
from soups.train_input import TrainImages, epoch_batches


def _config(pretrained, **train) -> FinetuneConfig:
    settings = {"epochs": 1, "lr": 3e-4, "seed": 0, "batch_size": 64, **train}
    return FinetuneConfig.model_validate({"model": {"pretrained": str(pretrained)}, "train": settings})


@pytest.fixture(scope="module")
def bundle():
    return load_dataset(DataConfig())


@pytest.fixture(scope="module")
def memory_inputs(pretrained_checkpoint):
    return prepare_finetune(_config(pretrained_checkpoint))


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_and_in_memory_epochs_give_the_same_batches_when_augmentation_is_off(memory_inputs, workers):
    train = TrainConfig(batch_size=100, seed=3, workers=workers)
    decoded = memory_inputs.train
    streamed = TrainImages(decoded.dataset, None)
    memory_epoch = epoch_batches(decoded, memory_inputs.preprocess, train)
    stream_epoch = epoch_batches(streamed, memory_inputs.preprocess, train)
    for epoch in (1, 2):  # a new seeded order each epoch, the same on both paths
        pairs = list(zip(memory_epoch(epoch), stream_epoch(epoch), strict=True))
        assert len(pairs) == -(-len(decoded) // 100)
        for (images_a, labels_a), (images_b, labels_b) in pairs:
            assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)


def test_a_train_split_over_budget_streams_and_trains_the_same_model(pretrained_checkpoint, memory_inputs, tmp_path):
    config = _config(pretrained_checkpoint, cache_bytes=0, workers=2)
    streamed = prepare_finetune(config)
    assert streamed.train.streamed and not memory_inputs.train.streamed
    assert isinstance(streamed.heldout, StreamedImages), "held-out over budget streams too"
    from soups.checkpoint import load_state_dict

    a = load_state_dict(finetune(config, streamed, tmp_path / "s.safetensors").checkpoint)
    b = load_state_dict(finetune(_config(pretrained_checkpoint), memory_inputs, tmp_path / "m.safetensors").checkpoint)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), "same batches, same model"


def test_augmented_streaming_runs_the_papers_train_transform(pretrained_checkpoint, tmp_path):
    config = _config(pretrained_checkpoint, cache_bytes=0, workers=2, crop_scale=(0.5, 1.0), randaugment_n=2)
    inputs = prepare_finetune(config)
    batches = epoch_batches(inputs.train, inputs.preprocess, config.train)
    images, labels = next(iter(batches(1)))
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, inputs.preprocess.size, inputs.preprocess.size)
    result = finetune(config, inputs, tmp_path / "aug.safetensors")
    assert result.checkpoint.is_file()


def test_evaluation_streams_beyond_the_cache_budget_and_scores_the_same(memory_inputs, bundle):
    preprocess = memory_inputs.preprocess
    cached, shifts = evaluation_splits(bundle, preprocess)
    budget = len(bundle.heldout) * preprocess.image_bytes()  # room for held-out only
    mixed, _ = evaluation_splits(bundle, preprocess, cache_bytes=budget, workers=2)
    assert isinstance(mixed["heldout"], ImageTensors), "held-out is cached first: greedy scores it most"
    assert all(isinstance(mixed[name], StreamedImages) for name in ("test", *shifts))
    model = memory_inputs.start
    a = Evaluator(model, cached, preprocess, shifts=shifts).report().scores
    b = Evaluator(model, mixed, preprocess, shifts=shifts).report().scores
    assert a == pytest.approx(b)


def test_shift_sets_with_a_class_subset_are_scored_on_those_classes_only(memory_inputs, bundle):
    preprocess = memory_inputs.preprocess
    test = decode(bundle.test, preprocess)
    rows = torch.nonzero((test.labels == 1) | (test.labels == 7)).flatten()
    two = test.subset(rows)
    model = memory_inputs.start
    full = Evaluator(model, {"two-classes": two}, preprocess).metrics("two-classes")
    own = {"two-classes": ImageTensors(two.images, (two.labels == 7).long())}  # a set's labels are its own classes
    masked = Evaluator(model, own, preprocess, class_groups={"two-classes": [[1], [7]]}).metrics("two-classes")
    with torch.no_grad():
        logits = model(preprocess.normalize(two.images))[:, [1, 7]]
    expected = (logits.argmax(1) == (two.labels == 7).long()).float().mean()
    assert masked.accuracy == pytest.approx(float(expected))
    assert masked.accuracy >= full.accuracy, "choosing between two classes is never harder than among ten"


def test_posterize_at_a_low_magnitude_blackens_the_image_as_the_papers_pillow_did(memory_inputs):
    from PIL import Image

    from soups.train_input import randaugment_transform

    (posterize,) = [op for op in randaugment_transform(1, 2, memory_inputs.preprocess).ops if op.name == "Posterize"]
    posterize.prob = 1.0  # apply it for sure; M = 1 keeps int(1 / 10 * 4) = 0 bits
    image = Image.new("RGB", (8, 8), (200, 120, 40))
    assert posterize(image).getextrema() == ((0, 0), (0, 0), (0, 0))
