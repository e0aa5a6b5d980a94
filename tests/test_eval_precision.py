"""`eval.precision`: the kitchen evaluates in fp32 (the official evaluation) unless bf16 is asked for."""

from __future__ import annotations

import torch

from soups.config import load_config
from soups.cooking import prepare_cooking
from soups.evaluate import logits_of


def test_fp32_is_the_default_and_bf16_changes_the_logits(tmp_path):
    config = load_config(None, {"pretrain": None, "kitchen.bootstrap": 0})
    assert config.eval.precision == "fp32"
    setup = prepare_cooking(config, tmp_path)
    evaluator = setup.evaluator
    assert evaluator.precision == "fp32"
    data = evaluator.splits["heldout"]
    fp32 = logits_of(evaluator.module, data, evaluator.preprocess)
    again = logits_of(evaluator.module, data, evaluator.preprocess, precision="fp32")
    bf16 = logits_of(evaluator.module, data, evaluator.preprocess, precision="bf16")
    assert torch.equal(fp32, again) and fp32.dtype == bf16.dtype == torch.float32
    assert not torch.equal(fp32, bf16), "bf16 autocast rounds the matmuls: the logits move"
    assert (fp32 - bf16).abs().max() < 0.1 * fp32.abs().max()
    chosen = prepare_cooking(load_config(None, {"pretrain": None, "eval.precision": "bf16"}), tmp_path / "b")
    assert chosen.evaluator.precision == "bf16"
