"""The paper presets (configs/paper/) load with the shipped loader and say the paper's protocol."""

from __future__ import annotations

from pathlib import Path

import pytest

from soups.config import PipelineConfig, load_config, paper_search_space

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "paper"
TABLE_1 = ["best", "uniform", "greedy", "learned", "learned_by_layer", "ensemble", "greedy_ensemble", "wise_ft"]


def _timm_synsets(name: str) -> list[str]:
    import timm

    return (Path(timm.__file__).parent / "data" / "_info" / f"{name}_synsets.txt").read_text().split()


@pytest.fixture(scope="module", params=["released-vit-b32.yaml", "sweep-vit-b32.yaml"])
def preset(request) -> PipelineConfig:
    return load_config(PRESETS / request.param)


def test_both_presets_start_from_openai_clip_b32_with_quickgelu(preset):
    assert preset.model.name == "ViT-B-32-quickgelu" and preset.model.pretrained == "openai"


def test_the_data_is_imagenet_with_the_official_heldout_and_five_shifts(preset):
    data = preset.data
    assert data.name == "imagefolder" and data.root == Path("/data/imagenet")
    assert data.heldout.source == "train" and data.heldout.mask == Path("/data/imagenet/imagenet_98_idxs.npy")
    assert data.classnames == "imagenet" and data.templates == "openai_imagenet"
    assert data.label_maps == {"imagenetv2": "index", "objectnet": "/data/imagenet/objectnet_to_imagenet_1k.json"}
    assert data.border_crop == {"objectnet": 2}
    assert sorted(data.class_subsets) == ["imagenet_a", "imagenet_r"]
    for name in ("imagenet_r", "imagenet_a"):
        assert data.class_subsets[name] == _timm_synsets(name)
        assert len(set(data.class_subsets[name])) == 200
    assert "n01443537" in data.class_subsets["imagenet_r"]  # goldfish is in -R, not in -A
    assert "n01443537" not in data.class_subsets["imagenet_a"]


def test_evaluation_is_fp32_and_the_kitchen_is_table_1_under_the_whole_heldout_protocol(preset):
    assert preset.eval.precision == "fp32"
    kitchen = preset.kitchen
    assert kitchen.learned_fit_fraction == 0
    assert kitchen.paper == "vit-b32"
    assert kitchen.recipe_names() == TABLE_1
    options = {choice.name: choice.options for choice in kitchen.recipes}
    for learned in ("learned", "learned_by_layer"):
        assert options[learned]["epochs"] == 5
        assert options[learned]["lr"] == 0.05 and options[learned]["batch_size"] == 256
    assert options["greedy"]["strict"] is True  # the official code's '>', which produced the table
    assert preset.kitchen.promotion_metric == "heldout"
    assert preset.train.device == "cuda"


def test_both_presets_share_one_data_section_and_one_kitchen():
    released = load_config(PRESETS / "released-vit-b32.yaml")
    sweep = load_config(PRESETS / "sweep-vit-b32.yaml")
    assert released.data == sweep.data and released.kitchen == sweep.kitchen and released.eval == sweep.eval
    assert released.experiment != sweep.experiment  # imported and swept ingredients never mix


def test_the_sweep_is_the_papers_random_search_of_72_lp_ft_trials():
    config = load_config(PRESETS / "sweep-vit-b32.yaml")
    assert config.sweep.sampler == "random" and config.sweep.n_trials == 72
    train = config.train
    assert train.init == "linear_probe"
    assert train.warmup_steps == 500 and train.batch_size == 256 and train.grad_clip == 1.0
    assert train.crop_scale == (0.08, 1.0) and train.hflip is True
    assert config.space == paper_search_space()
    space = config.space
    assert (space["lr"].kind, space["lr"].low, space["lr"].high) == ("loguniform", 1e-6, 1e-4)
    assert (space["weight_decay"].low, space["weight_decay"].high) == (8e-5, 0.53)
    assert (space["epochs"].kind, space["epochs"].low, space["epochs"].high) == ("int", 4, 16)
    assert space["label_smoothing"].or_zero and space["label_smoothing"].high == 0.225
    assert space["mixup_alpha"].or_zero and space["mixup_alpha"].high == 0.875
    assert (space["randaugment_m"].low, space["randaugment_m"].high) == (1, 20)
    assert (space["randaugment_n"].low, space["randaugment_n"].high) == (0, 2)  # N = 0: no RandAugment
    sampled = {"lr", "weight_decay", "epochs", "label_smoothing", "mixup_alpha", "randaugment_m", "randaugment_n"}
    assert set(space) == sampled
    # No sampled field changes the probe, so every trial starts from the one fitted per sweep.
    assert not set(space) & {"init", "probe_steps", "probe_weight_decays"}


def test_the_released_preset_fine_tunes_nothing():
    config = load_config(PRESETS / "released-vit-b32.yaml")
    assert config.train.init == "zero_shot"  # unused: the kitchen only cooks the imported checkpoints
    assert config.train.eval_batch_size >= 512
