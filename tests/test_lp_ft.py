"""LP-FT (`train.init: linear_probe`): the head is fitted on frozen train features first, then fine-tuning
starts from it, as the paper's released ingredients were made."""

from __future__ import annotations

import pytest
import torch

from soups.checkpoint import load_state_dict
from soups.config import ConfigError, FinetuneConfig, PipelineConfig, TrainConfig, load_config
from soups.probe import head_accuracy, image_features
from soups.train import finetune, prepare_finetune


def _config(pretrained, **train) -> FinetuneConfig:
    settings = {"epochs": 1, "seed": 0, "init": "linear_probe", **train}
    return FinetuneConfig.model_validate({"model": {"pretrained": str(pretrained)}, "train": settings})


@pytest.fixture(scope="module")
def inputs(pretrained_checkpoint):
    return prepare_finetune(_config(pretrained_checkpoint))


def test_the_probe_moves_the_head_and_fits_the_frozen_train_features_at_least_as_well(inputs):
    probe = inputs.probe
    assert probe is not None and probe.settings == (100, (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2))
    assert probe.metrics["probe_weight_decay"] in probe.settings[1]
    assert probe.metrics["probe_train_images"] == len(inputs.train)
    zero_weight, zero_bias = inputs.start.head.weight.detach(), inputs.start.head.bias.detach()
    assert probe.weight.shape == zero_weight.shape and probe.bias.shape == zero_bias.shape
    assert not torch.allclose(probe.weight, zero_weight, atol=1e-3)
    # Recomputed from the frozen start independently of the stored metrics.
    images = inputs.train.decoded
    features, labels = image_features(inputs.start, images, inputs.preprocess.normalize, 256, "cpu")
    assert torch.allclose(features.norm(dim=1), torch.ones(len(features)), atol=1e-5)  # what the head sees
    zero_shot = head_accuracy(features, labels, zero_weight, zero_bias)
    probed = head_accuracy(features, labels, probe.weight, probe.bias)
    assert probed >= zero_shot and probed > 0.5, (probed, zero_shot)
    assert probe.metrics["probe_train_accuracy"] == pytest.approx(probed)
    assert probe.metrics["zeroshot_train_accuracy"] == pytest.approx(zero_shot)
    # The shared start itself is never changed: WiSE-FT and the kitchen's base stay zero-shot.
    assert inputs.start.head.weight.data_ptr() == zero_weight.data_ptr()


def test_the_probe_is_deterministic_on_the_cpu(pretrained_checkpoint, inputs):
    again = prepare_finetune(_config(pretrained_checkpoint))
    assert torch.equal(again.probe.weight, inputs.probe.weight) and torch.equal(again.probe.bias, inputs.probe.bias)


def test_an_lp_ft_run_starts_from_the_probe_head(pretrained_checkpoint, inputs, tmp_path):
    # lr this small leaves every weight where training started: the checkpoint is the start.
    config = _config(pretrained_checkpoint, lr=1e-12, warmup_steps=0, weight_decay=0.0, grad_clip=None)
    result = finetune(config, inputs, tmp_path / "lpft.safetensors")
    state = load_state_dict(result.checkpoint)
    assert torch.allclose(state["head.weight"], inputs.probe.weight, atol=1e-6)
    assert torch.allclose(state["head.bias"], inputs.probe.bias, atol=1e-6)
    assert not torch.allclose(state["head.weight"], inputs.start.head.weight.detach(), atol=1e-3)
    visual = {k: v for k, v in inputs.start.state_dict().items() if k.startswith("visual.")}
    assert all(torch.allclose(state[k], v, atol=1e-6) for k, v in visual.items())
    metrics = result.metrics
    for key in ("zeroshot_train_accuracy", "probe_train_accuracy", "probe_seconds", "start_heldout_accuracy"):
        assert key in metrics, metrics
    assert metrics["zeroshot_heldout_accuracy"] == inputs.probe.metrics["zeroshot_heldout_accuracy"]
    assert metrics["start_heldout_accuracy"] == pytest.approx(metrics["heldout_accuracy"], abs=1e-6)


def test_a_zero_shot_run_on_the_same_inputs_starts_from_the_zero_shot_head(pretrained_checkpoint, inputs, tmp_path):
    config = _config(pretrained_checkpoint, init="zero_shot", lr=1e-12, warmup_steps=0, weight_decay=0.0)
    result = finetune(config, inputs, tmp_path / "zs.safetensors")
    state = load_state_dict(result.checkpoint)
    assert torch.allclose(state["head.weight"], inputs.start.head.weight.detach(), atol=1e-6)
    assert "probe_train_accuracy" not in result.metrics
    assert result.metrics["zeroshot_heldout_accuracy"] == result.metrics["start_heldout_accuracy"]


def test_a_run_whose_probe_settings_differ_fits_its_own_probe(pretrained_checkpoint, inputs, tmp_path):
    config = _config(pretrained_checkpoint, probe_steps=3, lr=1e-12, warmup_steps=0, weight_decay=0.0)
    result = finetune(config, inputs, tmp_path / "own.safetensors")
    head = load_state_dict(result.checkpoint)["head.weight"]
    assert not torch.allclose(head, inputs.probe.weight, atol=1e-4)
    assert not torch.allclose(head, inputs.start.head.weight.detach(), atol=1e-4)


def test_zero_shot_inputs_carry_no_probe_and_a_sampled_init_still_gets_one(pretrained_checkpoint, tmp_path):
    zero = prepare_finetune(_config(pretrained_checkpoint, init="zero_shot"))
    assert zero.probe is None
    result = finetune(_config(pretrained_checkpoint, lr=1e-12, warmup_steps=0), zero, tmp_path / "s.safetensors")
    assert result.metrics["probe_train_accuracy"] >= result.metrics["zeroshot_train_accuracy"]


def test_init_defaults_to_zero_shot_and_rejects_unknown_values(tmp_path):
    assert TrainConfig().init == "zero_shot"
    assert PipelineConfig().finetune_config({"init": "linear_probe"}).train.init == "linear_probe"
    with pytest.raises(ValueError, match="init"):
        TrainConfig(init="lp_ft")
    with pytest.raises(ValueError, match="probe_weight_decays"):
        TrainConfig(probe_weight_decays=[1e-4, -1.0])
    with pytest.raises(ValueError, match="probe_weight_decays"):
        TrainConfig(probe_weight_decays=[])
    path = tmp_path / "config.yaml"
    path.write_text("train:\n  init: linear-probe\n")
    with pytest.raises(ConfigError, match=r"train\.init.*'zero_shot' or 'linear_probe'"):
        load_config(path)
