"""Offline contrastive pretraining: a usable zero-shot start, saved as a standard open_clip checkpoint."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from soups.config import DataConfig, PretrainConfig
from soups.data import DatasetBundle, load_dataset
from soups.evaluate import evaluate
from soups.images import Preprocess, decode
from soups.models import build_classifier
from soups.pretrain import PretrainResult, label_aware_clip_loss, pretrain, train_clip
from soups.runtime import available_cores, use_cores

TINY = "soups-vit-tiny"


@pytest.fixture(scope="module")
def digits() -> DatasetBundle:
    return load_dataset(DataConfig(name="digits", seed=0))


def test_short_pretraining_beats_chance_by_a_clear_margin(pretrained: PretrainResult) -> None:
    chance = 1 / 10
    assert pretrained.zero_shot_accuracy > chance + 0.2
    assert pretrained.checkpoint.is_file()
    assert not list(pretrained.checkpoint.parent.glob(".*.tmp"))  # written atomically, nothing left


def test_reported_accuracy_is_heldout_zero_shot_of_the_saved_file(
    pretrained: PretrainResult, digits: DatasetBundle
) -> None:
    checkpoint = str(pretrained.checkpoint)
    classifier = build_classifier(TINY, checkpoint, digits.classnames, digits.templates)
    preprocess = Preprocess.of(classifier)
    heldout = evaluate(classifier, decode(digits.heldout, preprocess), preprocess)
    assert heldout.accuracy == pytest.approx(pretrained.zero_shot_accuracy)


def test_checkpoint_loads_in_open_clip_with_identical_features(
    pretrained: PretrainResult, digits: DatasetBundle
) -> None:
    # Retraining with the same seed must reproduce the saved model exactly (CPU determinism), so the
    # in-memory model can be compared with what open_clip reads back from the file.
    before = torch.random.get_rng_state()
    in_memory = train_clip(TINY, digits.pretrain, digits.classnames, digits.templates, PretrainConfig())
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is left alone
    checkpoint = str(pretrained.checkpoint)
    loaded, _, eval_tf = open_clip.create_model_and_transforms(TINY, pretrained=checkpoint)
    loaded.eval()
    images = torch.stack([eval_tf(digits.heldout[i][0]) for i in range(16)])
    tokens = open_clip.get_tokenizer(TINY)(["a handwritten seven."])
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), in_memory.encode_image(images))
        assert torch.equal(loaded.encode_text(tokens), in_memory.encode_text(tokens))
    assert torch.equal(loaded.logit_scale, in_memory.logit_scale)


def test_bundle_without_pretrain_split_is_refused(digits: DatasetBundle, tmp_path: Path) -> None:
    no_pretrain = dataclasses.replace(digits, name="imagefolder", pretrain=None)
    with pytest.raises(ValueError, match="no pretrain split"):
        pretrain(PretrainConfig(epochs=1), TINY, no_pretrain, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_label_aware_loss_prefers_class_structure_over_instance_discrimination() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    scale = torch.tensor(50.0)
    prototypes = F.normalize(torch.randn(2, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    by_class = prototypes[labels]  # same-class images and captions identical: all a classifier needs
    by_instance = torch.eye(4, 8)  # every pair its own direction: what one-hot targets ask for

    def soft(features: torch.Tensor) -> float:
        return label_aware_clip_loss(features, features, labels, scale).item()

    def one_hot(features: torch.Tensor) -> float:
        return open_clip.ClipLoss()(features, features, scale).item()

    # Cross-entropy is bounded below by the target's entropy (ln 2 here); class structure attains it.
    assert soft(by_class) == pytest.approx(math.log(2), abs=1e-4)
    assert soft(by_instance) > soft(by_class) + 1
    # Plain CLIP loss instead rewards pushing same-class pairs apart (false negatives).
    assert one_hot(by_instance) < one_hot(by_class) - 0.5


def test_label_aware_loss_equals_clip_loss_when_labels_are_distinct() -> None:
    g = torch.Generator().manual_seed(1)
    images = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    texts = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    soft = label_aware_clip_loss(images, texts, torch.arange(5), scale)
    torch.testing.assert_close(soft, open_clip.ClipLoss()(images, texts, scale))


def test_threads_default_to_every_available_core() -> None:
    before = torch.get_num_threads()
    try:
        assert use_cores(1) == torch.get_num_threads() == 1
        assert use_cores() == torch.get_num_threads() == available_cores()
    finally:
        torch.set_num_threads(before)
