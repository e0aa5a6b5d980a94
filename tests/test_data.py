"""Dataset registry: split integrity of digits, discovery on disk, and path-naming failures (bad layouts when
loading, bad image files when first read)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import Dataset

from soups.config import DataConfig
from soups.data import (
    DATASETS,
    DIGIT_NAMES,
    ArrayDataset,
    DatasetBundle,
    DatasetError,
    load_dataset,
    stratified_split,
)

SPLITS = ("pretrain", "train", "heldout", "test")


@pytest.fixture(scope="module")
def digits() -> DatasetBundle:
    return load_dataset(DataConfig(name="digits", seed=0))


def _indices(bundle: DatasetBundle, split: str) -> np.ndarray:
    dataset = getattr(bundle, split)
    assert isinstance(dataset, ArrayDataset)
    return dataset.indices


def test_digits_splits_partition_the_dataset(digits: DatasetBundle) -> None:
    sizes = {split: len(getattr(digits, split)) for split in SPLITS}
    assert sum(sizes.values()) == 1797
    assert sizes == {"pretrain": 631, "train": 628, "heldout": 179, "test": 359}
    union = np.concatenate([_indices(digits, s) for s in SPLITS])
    assert len(np.unique(union)) == 1797


def test_digits_splits_are_stratified(digits: DatasetBundle) -> None:
    for split in SPLITS:
        counts = np.bincount(getattr(digits, split).labels, minlength=10)
        assert (counts > 0).all(), split
        share = counts / counts.sum()
        assert np.abs(share - 0.1).max() < 0.02, (split, counts)


def test_digits_split_is_seeded() -> None:
    again = load_dataset(DataConfig(name="digits", seed=0))
    other = load_dataset(DataConfig(name="digits", seed=1))
    first = load_dataset(DataConfig(name="digits", seed=0))
    for split in SPLITS:
        assert np.array_equal(_indices(first, split), _indices(again, split))
        assert not np.array_equal(_indices(first, split), _indices(other, split))
    for name in first.shifts:
        assert np.array_equal(first.shifts[name].images, again.shifts[name].images)
        assert not np.array_equal(first.shifts[name].images, other.shifts[name].images)


def test_digits_items_and_metadata(digits: DatasetBundle) -> None:
    image, label = digits.train[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (32, 32)
    assert type(label) is int and 0 <= label < 10
    assert digits.classnames == DIGIT_NAMES and digits.class_groups == {}
    assert all(t.count("{}") == 1 for t in digits.templates)
    pixels = np.asarray(image)
    assert pixels.dtype == np.uint8 and pixels.max() > 128


def test_digits_match_sklearn(digits: DatasetBundle) -> None:
    from sklearn.datasets import load_digits

    raw = load_digits()
    idx = _indices(digits, "test")
    assert np.array_equal(digits.test.labels, raw.target[idx])
    small = np.asarray(digits.test[0][0].convert("L").resize((8, 8), Image.Resampling.BOX), dtype=float)
    assert np.corrcoef(small.ravel(), raw.images[idx[0]].ravel())[0, 1] > 0.9


def test_digits_shifts_relabel_the_test_split(digits: DatasetBundle) -> None:
    assert {"rotate", "noise", "blur", "invert"} <= set(digits.shifts)
    clean = digits.test
    for name, shifted in digits.shifts.items():
        assert len(shifted) == len(clean), name
        assert np.array_equal(shifted.labels, clean.labels), name
        assert [shifted[i][1] for i in range(5)] == [clean[i][1] for i in range(5)]
        image, _ = shifted[0]
        assert image.mode == "RGB" and image.size == (32, 32)
        diff = np.abs(shifted.images.astype(int) - clean.images.astype(int)).mean()
        assert diff > 5, (name, diff)
        stored = Image.fromarray(shifted.images[3]).convert("RGB")
        assert shifted[3][0].tobytes() == stored.tobytes(), "items come from the array made at load, not per access"


def test_digits_shifts_are_made_once_from_a_seed_and_never_from_selection_images() -> None:
    first, again = load_dataset(DataConfig(seed=0)), load_dataset(DataConfig(seed=0))
    other = load_dataset(DataConfig(seed=5))
    assert np.array_equal(first.shifts["noise"].images, again.shifts["noise"].images), "same seed, same shift"
    assert not np.array_equal(first.shifts["noise"].images, other.shifts["noise"].images), "the seed draws the shift"
    selection = set(first.heldout.indices) | set(first.train.indices)
    for name, shifted in first.shifts.items():
        assert selection.isdisjoint(shifted.indices), f"{name} is built from images used for training or selection"


def test_stratified_split_keeps_every_row_once() -> None:
    labels = np.array([0] * 7 + [1] * 3 + [2])
    parts = stratified_split(labels, [0.7, 0.1, 0.2], seed=3)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(labels)))
    assert set(labels[parts[0]]) == {0, 1, 2}  # the training part always sees every class


def test_unknown_dataset_lists_known_names() -> None:
    config = DataConfig.model_construct(name="nope", root=None, manifest=None, seed=0)
    with pytest.raises(DatasetError, match="csv, digits, imagefolder"):
        load_dataset(config)
    assert set(DATASETS) == {"digits", "imagefolder", "csv"}


# --------------------------------------------------------------------------------------------- on disk


def _png(path: Path, value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (6, 6), value).save(path)
    return path


def _tree(root: Path, splits: dict[str, dict[str, int]]) -> Path:
    """Write `count` small PNGs per split/class; pixel values encode the class for label checks."""
    for split, classes in splits.items():
        for cls, count in classes.items():
            for i in range(count):
                _png(root / split / cls / f"{i}.png", 40 if cls == "cat" else 200)
    return root


FULL = {"train": {"cat": 3, "dog": 2}, "val": {"cat": 1, "dog": 1}, "test": {"cat": 2, "dog": 1}}


def test_imagefolder_loads(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data", {**FULL, "sketch": {"dog": 2}})
    (root / "README.txt").write_text("ignored")
    bundle = load_dataset(DataConfig(name="imagefolder", root=root))
    assert bundle.classnames == ["cat", "dog"]
    assert [len(bundle.train), len(bundle.heldout), len(bundle.test)] == [5, 2, 3]
    assert set(bundle.shifts) == {"sketch"} and bundle.pretrain is None
    assert bundle.class_groups == {"sketch": ((1,),)}, "sketch has only dogs: score it on the dog class alone"
    assert [bundle.shifts["sketch"][i][1] for i in range(2)] == [0, 0], "labelled by its one class"
    for image, label in (bundle.train[i] for i in range(len(bundle.train))):
        assert image.mode == "RGB" and type(label) is int
        assert (image.getpixel((0, 0))[0] == 200) == (bundle.classnames[label] == "dog")
    assert all("{}" in t for t in bundle.templates)


def _csv(folder: Path, header: str, rows: list[str]) -> Path:
    path = folder / "m.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_csv_with_split_column(tmp_path: Path) -> None:
    _png(tmp_path / "img" / "a.png", 40)
    _png(tmp_path / "img" / "b.png", 200)
    absolute = _png(tmp_path / "elsewhere" / "c.png", 200)
    rows = ["img/a.png,cat,train", "img/b.png,dog,train", "img/a.png,cat,val", f"{absolute},dog,test"]
    manifest = _csv(tmp_path, "path,label,split", [*rows, "img/b.png,dog,night", "img/a.png,cat,night"])
    bundle = load_dataset(DataConfig(name="csv", manifest=manifest))
    assert bundle.classnames == ["cat", "dog"]
    assert [len(bundle.train), len(bundle.heldout), len(bundle.test)] == [2, 1, 1]
    assert set(bundle.shifts) == {"night"} and len(bundle.shifts["night"]) == 2
    assert bundle.class_groups == {}, "night has both classes"
    image, label = bundle.test[0]
    assert image.mode == "RGB" and label == 1
    assert [bundle.shifts["night"][i][1] for i in range(2)] == [1, 0]


def test_csv_without_split_column_is_stratified_and_seeded(tmp_path: Path) -> None:
    rows = [f"img/{cls}{i}.png,{cls}" for cls in ("cat", "dog") for i in range(10)]
    for row in rows:
        _png(tmp_path / row.split(",")[0], 40)
    manifest = _csv(tmp_path, "path,label", rows)
    bundle = load_dataset(DataConfig(name="csv", manifest=manifest, seed=0))
    assert [len(bundle.train), len(bundle.heldout), len(bundle.test)] == [14, 2, 4]
    assert bundle.shifts == {}
    for split in (bundle.train, bundle.heldout, bundle.test):
        assert sorted(set(split.labels)) == [0, 1]
    again = load_dataset(DataConfig(name="csv", manifest=manifest, seed=0))
    other = load_dataset(DataConfig(name="csv", manifest=manifest, seed=1))
    assert again.test.paths == bundle.test.paths != other.test.paths


# ------------------------------------------------------------------------------------------- bad input


def _imagefolder_error(root: Path) -> str:
    with pytest.raises(DatasetError) as info:
        load_dataset(DataConfig(name="imagefolder", root=root))
    return str(info.value)


def test_imagefolder_missing_root(tmp_path: Path) -> None:
    assert str(tmp_path / "absent") in _imagefolder_error(tmp_path / "absent")


def test_imagefolder_missing_split_folder(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"train": FULL["train"], "val": FULL["val"]})
    assert str(root / "test") in _imagefolder_error(root)


def test_imagefolder_empty_split(tmp_path: Path) -> None:
    root = _tree(tmp_path, FULL)
    for png in (root / "val").rglob("*.png"):
        png.unlink()
    assert str(root / "val") in _imagefolder_error(root)


def test_imagefolder_unknown_class_folder(tmp_path: Path) -> None:
    root = _tree(tmp_path, {**FULL, "test": {"cat": 1, "bird": 1}})
    assert str(root / "test" / "bird") in _imagefolder_error(root)


def test_imagefolder_unknown_class_in_shift(tmp_path: Path) -> None:
    root = _tree(tmp_path, {**FULL, "fog": {"fish": 1}})
    assert str(root / "fog" / "fish") in _imagefolder_error(root)


def _read_error(dataset: Dataset) -> str:
    """Read every item (as decoding for training does) and return the error a bad file raises."""
    with pytest.raises(DatasetError) as info:
        for index in range(len(dataset)):
            dataset[index]
    return str(info.value)


def test_imagefolder_unreadable_image_fails_when_read(tmp_path: Path) -> None:
    root = _tree(tmp_path, FULL)
    broken = root / "train" / "dog" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    bundle = load_dataset(DataConfig(name="imagefolder", root=root))  # loading opens no image
    assert str(broken) in _read_error(bundle.train)


def _csv_error(manifest: Path) -> str:
    with pytest.raises(DatasetError) as info:
        load_dataset(DataConfig(name="csv", manifest=manifest))
    return str(info.value)


def _good_images(folder: Path) -> None:
    _png(folder / "a.png", 40)
    _png(folder / "b.png", 200)


def test_csv_missing_manifest(tmp_path: Path) -> None:
    assert str(tmp_path / "none.csv") in _csv_error(tmp_path / "none.csv")


def test_csv_missing_image_fails_when_read(tmp_path: Path) -> None:
    _good_images(tmp_path)
    manifest = _csv(tmp_path, "path,label,split", ["a.png,cat,train", "gone.png,cat,val", "b.png,cat,test"])
    bundle = load_dataset(DataConfig(name="csv", manifest=manifest))
    message = _read_error(bundle.heldout)
    assert str(tmp_path / "gone.png") in message and "does not exist" in message


def test_csv_label_not_in_train(tmp_path: Path) -> None:
    _good_images(tmp_path)
    manifest = _csv(tmp_path, "path,label,split", ["a.png,cat,train", "b.png,cat,val", "b.png,dog,test"])
    message = _csv_error(manifest)
    assert str(manifest) in message and "'dog'" in message


def test_csv_empty_split(tmp_path: Path) -> None:
    _good_images(tmp_path)
    manifest = _csv(tmp_path, "path,label,split", ["a.png,cat,train", "b.png,cat,test"])
    message = _csv_error(manifest)
    assert str(manifest) in message and "'val'" in message


def test_csv_unreadable_image_fails_when_read(tmp_path: Path) -> None:
    _good_images(tmp_path)
    (tmp_path / "bad.png").write_text("text, not pixels")
    manifest = _csv(tmp_path, "path,label,split", ["a.png,cat,train", "bad.png,cat,val", "b.png,cat,test"])
    bundle = load_dataset(DataConfig(name="csv", manifest=manifest))
    assert str(tmp_path / "bad.png") in _read_error(bundle.heldout)


@pytest.mark.parametrize("header", ["path", "path,label,splt", "file,label"])
def test_csv_bad_header(tmp_path: Path, header: str) -> None:
    _good_images(tmp_path)
    manifest = _csv(tmp_path, header, ["a.png,cat,train"])
    assert str(manifest) in _csv_error(manifest)


def test_csv_no_rows(tmp_path: Path) -> None:
    manifest = _csv(tmp_path, "path,label", [])
    assert str(manifest) in _csv_error(manifest)
