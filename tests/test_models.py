"""Classifier construction, checkpoints and pretrained-weight resolution of open_clip models, CPU, offline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from soups import models
from soups.checkpoint import load_state_dict, save_state_dict
from soups.models import (
    CheckpointMismatchError,
    ClipClassifier,
    PretrainedUnavailableError,
    build_classifier,
    classifier_from_clip,
    create_clip,
    load_classifier,
    save_classifier,
)

TINY = "soups-vit-tiny"
SMALL = "soups-vit-small"
CLASSES = ["zero", "one", "two", "three"]
TEMPLATES = ["a photo of the digit {}.", "a handwritten {}.", "the number {}."]


def _images(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_clip() -> torch.nn.Module:
    torch.manual_seed(0)
    model, _, _, _ = create_clip(TINY)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_classifier(tiny_clip: torch.nn.Module) -> ClipClassifier:
    tokenizer = open_clip.get_tokenizer(TINY)
    return classifier_from_clip(tiny_clip, tokenizer, CLASSES, TEMPLATES, TINY)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_classifier: ClipClassifier) -> Path:
    return save_classifier(tiny_classifier, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def test_project_architectures_are_registered_once_and_tokenize_to_their_context_length() -> None:
    from open_clip import factory

    models.register_project_models()
    paths_before = len(factory._MODEL_CONFIG_PATHS)
    names = models.register_project_models()
    assert len(factory._MODEL_CONFIG_PATHS) == paths_before
    assert {TINY, SMALL} <= set(names) <= set(open_clip.list_models())
    assert models.model_config(TINY)["vision_cfg"]["image_size"] == 32 and models.model_embed_dim(TINY) == 64
    context = models.model_config(TINY)["text_cfg"]["context_length"]
    tokens = open_clip.get_tokenizer(TINY)(["a blurry low resolution image of the digit seven."])
    assert tokens.shape == (1, context) == (1, 16)
    assert int(tokens[0].argmax()) < context - 1  # the end-of-text token fits, nothing was truncated


def test_unknown_architecture_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="soups-vit-huge.*soups-vit-tiny"):
        models.model_config("soups-vit-huge")


def test_zero_shot_head_is_the_papers_prompt_ensemble(
    tiny_clip: torch.nn.Module, tiny_classifier: ClipClassifier
) -> None:
    weight, bias = tiny_classifier.head.weight.detach(), tiny_classifier.head.bias.detach()
    assert weight.shape == (len(CLASSES), models.model_embed_dim(TINY))
    scale = tiny_clip.logit_scale.exp().item()
    assert math.isclose(scale, 1 / 0.07, rel_tol=1e-5)  # open_clip's initial temperature
    unit = weight / scale
    torch.testing.assert_close(unit.norm(dim=1), torch.ones(len(CLASSES)))
    assert torch.count_nonzero(bias) == 0
    # Same as open_clip's reference implementation: mean of unit prompt embeddings, renormalised.
    tokenizer = open_clip.get_tokenizer(TINY)
    reference = open_clip.build_zero_shot_classifier(tiny_clip, tokenizer, CLASSES, TEMPLATES).T
    torch.testing.assert_close(unit, reference)
    # Logits are CLIP's zero-shot logits: scale * cos(image, class text).
    x = _images()
    with torch.no_grad():
        expected = scale * tiny_clip.encode_image(x, normalize=True) @ reference.T
        torch.testing.assert_close(tiny_classifier(x), expected)


def test_classifier_state_dict_is_visual_plus_head_with_clip_keys(
    tiny_clip: torch.nn.Module, tiny_classifier: ClipClassifier
) -> None:
    keys = list(tiny_classifier.state_dict())
    assert all(k.startswith(("visual.", "head.")) for k in keys)
    assert {k for k in keys if k.startswith("head.")} == {"head.weight", "head.bias"}
    clip_visual = {k: v.shape for k, v in tiny_clip.state_dict().items() if k.startswith("visual.")}
    ours = {k: v.shape for k, v in tiny_classifier.state_dict().items() if k.startswith("visual.")}
    assert ours == clip_visual
    assert not any(k.startswith(("text", "token_embedding", "transformer.")) for k in keys)


def test_build_classifier_returns_eval_mode_classifier_whose_preprocessing_matches_open_clip() -> None:
    from PIL import Image

    from soups.images import Preprocess

    classifier = build_classifier(TINY, None, CLASSES, TEMPLATES)
    assert isinstance(classifier, ClipClassifier) and not classifier.training
    assert classifier.num_classes == len(CLASSES) and classifier.model_name == TINY
    _, _, open_clip_eval = open_clip.create_model_and_transforms(TINY)
    preprocess = Preprocess.of(classifier)
    image = Image.new("RGB", (32, 32), (255, 200, 40))
    ours = preprocess.normalize(preprocess.decode_transform()(image).unsqueeze(0))[0]
    assert ours.shape == (3, 32, 32)
    torch.testing.assert_close(ours, open_clip_eval(image), atol=1e-5, rtol=0)


def test_load_classifier_round_trip_gives_identical_logits(
    tiny_classifier: ClipClassifier, tiny_checkpoint: Path
) -> None:
    loaded = load_classifier(tiny_checkpoint, TINY, num_classes=len(CLASSES))
    x = _images()
    with torch.no_grad():
        assert torch.equal(loaded(x), tiny_classifier(x))
    original = tiny_classifier.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in loaded.state_dict().items())
    rebuilt = models.classifier_from_state_dict(load_state_dict(tiny_checkpoint), TINY)
    assert rebuilt.num_classes == len(CLASSES)


def test_visual_part_of_a_classifier_checkpoint_loads_into_open_clip(
    tiny_classifier: ClipClassifier, tiny_checkpoint: Path
) -> None:
    clip = open_clip.create_model(TINY).eval()
    visual = {k: v for k, v in load_state_dict(tiny_checkpoint).items() if k.startswith("visual.")}
    result = clip.load_state_dict(visual, strict=False)
    assert result.unexpected_keys == []
    assert not any(k.startswith("visual.") for k in result.missing_keys)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(
            F.normalize(clip.encode_image(x), dim=-1), tiny_classifier.features(x), rtol=0, atol=0
        )


def test_wrong_head_size_names_file_key_and_architecture(tiny_checkpoint: Path) -> None:
    with pytest.raises(CheckpointMismatchError) as err:
        load_classifier(tiny_checkpoint, TINY, num_classes=7)
    message = str(err.value)
    assert str(tiny_checkpoint) in message and TINY in message and "head.weight" in message


def test_other_architecture_checkpoint_is_rejected(tiny_checkpoint: Path) -> None:
    with pytest.raises(CheckpointMismatchError) as err:
        load_classifier(tiny_checkpoint, SMALL, num_classes=len(CLASSES))
    message = str(err.value)
    assert str(tiny_checkpoint) in message and SMALL in message
    assert "missing keys" in message or "shape mismatches" in message


def test_full_clip_checkpoint_is_not_a_classifier(tmp_path: Path, tiny_clip: torch.nn.Module) -> None:
    path = save_state_dict(tiny_clip.state_dict(), tmp_path / "clip.safetensors")
    expected = r"unexpected keys: .*token_embedding|missing keys: head"
    with pytest.raises(CheckpointMismatchError, match=expected):
        load_classifier(path, TINY, num_classes=len(CLASSES))


def test_missing_files_are_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        load_classifier(missing, TINY, num_classes=3)
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        build_classifier(TINY, str(missing), CLASSES, TEMPLATES)
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        build_classifier(TINY, f"local-dir:{tmp_path / 'no-such-dir'}", CLASSES, TEMPLATES)


def test_unknown_tag_raises_pretrained_unavailable_naming_tag_and_fix() -> None:
    with pytest.raises(PretrainedUnavailableError) as err:
        build_classifier(TINY, "laion2b_s34b_b79k", CLASSES, TEMPLATES)
    message = str(err.value)
    assert "laion2b_s34b_b79k" in message and TINY in message
    assert "local-dir:" in message and ".safetensors" in message
    assert isinstance(err.value, RuntimeError)


def test_known_tag_offline_is_a_clear_error() -> None:
    # This machine reaches no model hub, so a real download attempt is what is tested here.
    with pytest.raises(PretrainedUnavailableError, match="laion2b_s34b_b79k.*ViT-B-32.*unreachable"):
        build_classifier("ViT-B-32", "laion2b_s34b_b79k", CLASSES, TEMPLATES)


def test_full_clip_file_and_local_dir_give_the_same_classifier(
    tmp_path: Path, tiny_clip: torch.nn.Module, tiny_classifier: ClipClassifier
) -> None:
    path = save_state_dict(tiny_clip.state_dict(), tmp_path / "open_clip_model.safetensors")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": models.model_config(TINY)}))
    from_file = build_classifier(TINY, str(path), CLASSES, TEMPLATES)
    from_dir = build_classifier(TINY, f"local-dir:{tmp_path}", CLASSES, TEMPLATES)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(from_file(x), tiny_classifier(x))
        torch.testing.assert_close(from_dir(x), tiny_classifier(x))
    with pytest.raises(CheckpointMismatchError, match="another architecture"):
        build_classifier(SMALL, f"local-dir:{tmp_path}", CLASSES, TEMPLATES)
    with pytest.raises(CheckpointMismatchError, match=SMALL):
        build_classifier(SMALL, str(path), CLASSES, TEMPLATES)


def test_the_packaged_classifier_refuses_float_pixels_and_wrong_shapes(tmp_path: Path) -> None:
    import numpy as np

    from soups.images import Preprocess
    from soups.models import empty_classifier
    from soups.serving import ClassifierSpec, predict_proba

    classifier = empty_classifier("soups-vit-tiny", 3)
    spec = ClassifierSpec("soups-vit-tiny", ["a", "b", "c"], Preprocess.of(classifier))
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert predict_proba(classifier, spec, pixels).shape == (2, 3)
    with pytest.raises(ValueError, match="expected uint8 pixels 0..255, got float32"):
        predict_proba(classifier, spec, pixels.astype(np.float32) / 255)
    with pytest.raises(ValueError, match="got shape"):
        predict_proba(classifier, spec, pixels[..., :1])


def test_a_pretrained_pickle_that_needs_code_is_refused_without_advice_to_unpickle_it(tmp_path: Path) -> None:
    import argparse

    from soups.models import create_clip

    path = tmp_path / "needs-code.pt"
    torch.save({"state_dict": argparse.Namespace(weights=1)}, path)
    with pytest.raises(models.CheckpointMismatchError) as caught:
        create_clip("soups-vit-tiny", str(path))
    assert "never run here" in str(caught.value) and "weights_only=False" not in str(caught.value)
