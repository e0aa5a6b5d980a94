"""`data.heldout.mask`: the official held-out split as a 0/1 array over the train images in torchvision
ImageFolder order (the paper's imagenet_98_idxs.npy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from soups.config import ConfigError, DataConfig, load_config
from soups.data import DatasetError, load_dataset

CLASSES = {"n02", "n01", "n10"}
FILES = ["9.png", "10.png", "a_1.png", "A_2.png", "b.PNG"]  # orders where a naive sort would differ


def _folder(root: Path) -> Path:
    for k, cls in enumerate(sorted(CLASSES)):
        for i, name in enumerate(FILES):
            path = root / "train" / cls / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (4, 4), (10 * k, 10 * i, 0)).save(path, format="PNG")
        (root / "val" / cls).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), (0, 0, 0)).save(root / "val" / cls / "v.png")
    return root


def _config(root: Path, mask: Path, **heldout) -> DataConfig:
    return DataConfig(name="imagefolder", root=root, heldout={"mask": str(mask), **heldout})


def test_the_mask_holds_out_its_ones_in_imagefolder_order(tmp_path):
    root = _folder(tmp_path / "in")
    order = [Path(path) for path, _ in ImageFolder(str(root / "train")).samples]
    rng = np.random.default_rng(0)
    mask = np.zeros(len(order), dtype=np.uint8)
    mask[rng.choice(len(order), 6, replace=False)] = 1
    np.save(tmp_path / "mask.npy", mask)
    bundle = load_dataset(_config(root, tmp_path / "mask.npy"))
    assert len(bundle.heldout) == 6 and len(bundle.train) == len(order) - 6
    assert [Path(p) for p in bundle.heldout.paths] == [order[i] for i in np.flatnonzero(mask)]
    assert [Path(p) for p in bundle.train.paths] == [order[i] for i in np.flatnonzero(mask == 0)]
    assert len(bundle.test) == len(CLASSES), "val/ is the test split, as ImageNet's val is the paper's test set"
    np.save(tmp_path / "bool.npy", mask.astype(bool))
    assert load_dataset(_config(root, tmp_path / "bool.npy")).heldout.paths == bundle.heldout.paths


def test_a_mask_of_another_length_is_refused_naming_both_counts(tmp_path):
    root = _folder(tmp_path / "in")
    np.save(tmp_path / "short.npy", np.ones(7, dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"has 7 entries but .* has 15 train images"):
        load_dataset(_config(root, tmp_path / "short.npy"))
    np.save(tmp_path / "twos.npy", np.full(15, 2))
    with pytest.raises(DatasetError, match="1-D array of 0/1 or booleans"):
        load_dataset(_config(root, tmp_path / "twos.npy"))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}] * 15, dtype=object))
    with pytest.raises(DatasetError, match="cannot be read as .npy"):
        load_dataset(_config(root, tmp_path / "objects.npy"))


def test_a_mask_implies_held_out_from_train_and_refuses_from_val(tmp_path):
    config = load_config(None, {"data.name": "imagefolder", "data.root": str(tmp_path), "data.heldout.mask": "m.npy"})
    assert config.data.heldout.source == "train"
    with pytest.raises(ConfigError, match="mask selects train images, but from is 'val'"):
        load_config(
            None,
            {"data.name": "imagefolder", "data.root": str(tmp_path), "data.heldout": {"mask": "m.npy", "from": "val"}},
        )
