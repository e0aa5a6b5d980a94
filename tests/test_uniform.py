"""Uniform soup: exact mean, order independent, streamed, and refusing bad checkpoints without writing."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from soups.checkpoint import load_state_dict
from soups.recipes import cook
from tests.helpers import random_state_dict, write_ingredients

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _float64_mean(ingredients, key):
    return torch.stack([load_state_dict(i.path)[key].double() for i in ingredients]).mean(0)


def test_uniform_soup_is_the_float64_mean(tmp_path):
    for dtype_name, dtype in DTYPES.items():
        for n in (1, 2, 7):
            folder = tmp_path / f"{dtype_name}-{n}"
            ingredients = write_ingredients(folder, list(range(n)), dtype)
            (dish,) = cook("uniform", ingredients)
            for key in ("layer.weight", "layer.bias", "norm.scale"):
                soup = dish.state_dict[key]
                assert soup.dtype == dtype, f"soup must keep the ingredients' dtype {dtype}"
                expected = _float64_mean(ingredients, key)
                # Accumulation is float32; the only further error is rounding the result to the stored dtype.
                tolerance = torch.finfo(dtype).eps * expected.abs().max().item() + 1e-6
                assert torch.allclose(soup.double(), expected, atol=tolerance, rtol=0), (dtype_name, n, key)
            assert torch.equal(dish.state_dict["counter"], torch.tensor([0])), "integer tensors come from the first"


def test_uniform_soup_with_mixed_dtypes_inside_a_checkpoint(tmp_path):
    from soups.checkpoint import Ingredient, save_state_dict

    ingredients = []
    for seed in range(3):
        sd = random_state_dict(seed)
        sd["layer.weight"] = sd["layer.weight"].half()
        sd["norm.scale"] = sd["norm.scale"].bfloat16()
        ingredients.append(Ingredient(save_state_dict(sd, tmp_path / f"m{seed}.safetensors")))
    (dish,) = cook("uniform", ingredients)
    assert dish.state_dict["layer.weight"].dtype == torch.float16
    assert dish.state_dict["norm.scale"].dtype == torch.bfloat16
    assert dish.state_dict["layer.bias"].dtype == torch.float32
    expected = _float64_mean(ingredients, "layer.bias")
    assert torch.allclose(dish.state_dict["layer.bias"].double(), expected, atol=1e-6)


def test_output_dtype_can_be_chosen(tmp_path):
    ingredients = write_ingredients(tmp_path, [1, 2], torch.bfloat16)
    (dish,) = cook("uniform", ingredients, dtype="float32")
    assert dish.state_dict["layer.weight"].dtype == torch.float32
    assert torch.allclose(
        dish.state_dict["layer.weight"].double(), _float64_mean(ingredients, "layer.weight"), atol=1e-6
    )


@settings(max_examples=15, deadline=None)
@given(order=st.permutations(list(range(5))))
def test_ingredient_order_does_not_matter(tmp_path_factory, order):
    folder = tmp_path_factory.mktemp("order")
    ingredients = write_ingredients(folder, list(range(5)))
    (reference,) = cook("uniform", ingredients)
    (shuffled,) = cook("uniform", [ingredients[i] for i in order])
    for key in ("layer.weight", "layer.bias", "norm.scale"):
        assert torch.allclose(reference.state_dict[key], shuffled.state_dict[key], atol=1e-6, rtol=1e-6)


def test_weights_digest_ignores_metadata_but_not_weights(tmp_path):
    from soups.checkpoint import save_state_dict, weights_digest

    state_dict = random_state_dict(3, torch.bfloat16)
    a = save_state_dict(state_dict, tmp_path / "a.safetensors", {"recipe": "x", "ingredients": "1,2"})
    b = save_state_dict(dict(reversed(state_dict.items())), tmp_path / "b.safetensors", {"other": "y"})
    assert weights_digest(a) == weights_digest(b)
    state_dict["layer.bias"] = state_dict["layer.bias"] + 1
    c = save_state_dict(state_dict, tmp_path / "c.safetensors")
    assert weights_digest(c) != weights_digest(a)


_WRITE = """
import sys, torch
from soups.checkpoint import save_state_dict
tensors = {f"layer{i}.weight": torch.arange(12.0).reshape(3, 4) + i for i in range(8)}
metadata = {f"key{i}": f"value {i} ü \\"quoted\\"" for i in range(12)}
save_state_dict(tensors, sys.argv[1], metadata)
"""


def test_the_same_checkpoint_written_by_two_processes_has_the_same_bytes(tmp_path):
    """safetensors writes metadata in a per-process hash order; save_state_dict puts it in key order, so a
    rerun's file has the same sha256 and loads the same metadata."""
    import hashlib
    import json
    import subprocess
    import sys

    from safetensors import safe_open

    paths = [tmp_path / f"{n}.safetensors" for n in range(3)]
    for path in paths:
        subprocess.run([sys.executable, "-c", _WRITE, str(path)], check=True)
    digests = {hashlib.sha256(path.read_bytes()).hexdigest() for path in paths}
    assert len(digests) == 1
    with safe_open(str(paths[0]), "pt") as f:
        assert f.metadata()["key3"] == 'value 3 ü "quoted"' and len(f.metadata()) == 12
    raw = paths[0].read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
