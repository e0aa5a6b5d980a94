"""ImageNet's layout in the dataset layer: class names and templates, held-out carved from train, index-named
and class-subset shift folders, the cached listing, and bad files met when reading."""

from __future__ import annotations

import io
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from soups.config import DataConfig
from soups.data import GENERIC_TEMPLATES, DatasetBundle, DatasetError, FileDataset, load_dataset
from soups.imagefiles import resolve_classnames


def _png_bytes(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (4, 4), value).save(buffer, format="PNG")
    return buffer.getvalue()


PNGS = {value: _png_bytes(value) for value in range(0, 256, 5)}


def _image(path: Path, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(PNGS[value - value % 5])
    return path


def _tree(root: Path, splits: dict[str, dict[str, int]]) -> Path:
    """``count`` images per split/class; the pixel value encodes the image's number within its class."""
    for split, classes in splits.items():
        for cls, count in classes.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                _image(root / split / cls / f"{i}.png", 5 * i)
    return root


def _load(root: Path, **data) -> DatasetBundle:
    return load_dataset(DataConfig(name="imagefolder", root=root, **data))


def _error(root: Path, **data) -> str:
    with pytest.raises(DatasetError) as info:
        _load(root, **data)
    return str(info.value)


def _labels_by_folder(dataset: FileDataset) -> dict[str, set[int]]:
    found: dict[str, set[int]] = {}
    for path, label in zip(dataset.paths, dataset.labels, strict=True):
        found.setdefault(path.parent.name, set()).add(label)
    return found


SMALL = {"train": {"cat": 2, "dog": 2, "fox": 1}, "val": {"cat": 1}, "test": {"dog": 1}}


# ------------------------------------------------------------------------------------ names, templates


def test_imagenet_classnames_follow_sorted_wordnet_ids(tmp_path: Path) -> None:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    wnids = [f"n{i:08d}" for i in range(1000)]
    train = {wnid: 1 for wnid in reversed(wnids)}  # creation order must not matter, only the sorted names
    root = _tree(tmp_path / "in1k", {"train": train, "val": {wnids[3]: 1}, "test": {wnids[999]: 1}})
    bundle = _load(root, classnames="imagenet")
    assert bundle.classnames == list(IMAGENET_CLASSNAMES)
    assert bundle.classnames[:2] == ["tench", "goldfish"]
    assert _labels_by_folder(bundle.train)["n00000417"] == {417}
    assert bundle.heldout.labels == [3] and bundle.test.labels == [999]


def test_imagenet_classnames_need_the_1000_wordnet_id_folders(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"train": {"n01": 1, "n02": 1, "n03": 1}, "val": {"n01": 1}, "test": {"n02": 1}})
    message = _error(root, classnames="imagenet")
    assert "1000" in message and "has 3 classes" in message and "mapping file" in message
    by_index = [str(i) for i in range(1000)]  # sorted as text, "10" would come before "2": a wrong mapping
    message = str(pytest.raises(DatasetError, resolve_classnames, "imagenet", by_index, "x").value)
    assert "not named by WordNet id: 0, 1, 2" in message


def test_classnames_from_a_mapping_file(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data", SMALL)
    names = tmp_path / "names.txt"
    names.write_text("dog\tdomestic dog, Canis familiaris\ncat,house cat\n\nfox\tred fox\nwolf\tgrey wolf\n")
    bundle = _load(root, classnames=str(names))
    assert bundle.classnames == ["house cat", "domestic dog, Canis familiaris", "red fox"]
    names.write_text("dog\tdomestic dog\ncat\thouse cat\n")
    message = _error(root, classnames=str(names))
    assert str(names) in message and "fox" in message and "cat," not in message


def test_templates_from_open_clip_and_from_a_file(tmp_path: Path) -> None:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    root = _tree(tmp_path / "data", SMALL)
    openai = _load(root, templates="openai_imagenet").templates
    assert len(openai) == 80 and all(isinstance(t, str) and t.count("{}") == 1 for t in openai)
    assert openai[0].format("tench") == OPENAI_IMAGENET_TEMPLATES[0]("tench")
    simple = _load(root, templates="simple").templates
    assert len(simple) == 7 and "itap of a {}." in simple
    assert _load(root).templates == GENERIC_TEMPLATES
    lines = tmp_path / "templates.txt"
    lines.write_text("a {} in the wild.\n\nart of a {}.\n")
    assert _load(root, templates=str(lines)).templates == ["a {} in the wild.", "art of a {}."]
    lines.write_text("a {} in the wild.\nno placeholder here\n")
    assert "no placeholder here" in _error(root, templates=str(lines))


# ----------------------------------------------------------------------------------------- held-out


def test_heldout_carved_from_train_is_stratified_seeded_and_val_is_test(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"train": {"cat": 10, "dog": 5, "fox": 20}, "val": {"cat": 2, "fox": 1}})
    carve = {"from": "train", "fraction": 0.2}
    bundle = _load(root, heldout=carve, seed=0)
    train, heldout = bundle.train, bundle.heldout
    assert isinstance(train, FileDataset) and isinstance(heldout, FileDataset)
    assert np.bincount(heldout.labels).tolist() == [2, 1, 4], "20 % of each class"
    assert np.bincount(train.labels).tolist() == [8, 4, 16]
    assert set(train.paths).isdisjoint(heldout.paths)
    assert sorted(train.paths + heldout.paths) == sorted((root / "train").rglob("*.png"))
    assert all(path.parent.parent == root / "val" for path in bundle.test.paths) and len(bundle.test) == 3
    assert bundle.shifts == {}
    assert _load(root, heldout=carve, seed=0).heldout.paths == heldout.paths, "same seed, same split"
    assert _load(root, heldout=carve, seed=1).heldout.paths != heldout.paths, "the seed draws the split"


def test_heldout_from_train_with_both_val_and_test_asks_which_is_test(tmp_path: Path) -> None:
    root = _tree(tmp_path, SMALL)
    message = _error(root, heldout={"from": "train"})
    assert str(root) in message and "both val and test" in message
    only_test = _tree(tmp_path / "only-test", {"train": SMALL["train"], "test": SMALL["test"]})
    assert _load(only_test, heldout={"from": "train", "fraction": 0.5}).test.labels == [1]


def test_layout_options_are_validated() -> None:
    with pytest.raises(ValueError, match="digits"):
        DataConfig(heldout={"from": "train"})
    with pytest.raises(ValueError, match="'train'"):
        DataConfig(name="imagefolder", root="x", label_maps={"train": "index"})
    with pytest.raises(ValueError, match="bad_files"):
        DataConfig(name="imagefolder", root="x", bad_files="ignore")
    with pytest.raises(ValueError, match="fraction"):
        DataConfig(name="imagefolder", root="x", heldout={"from": "train", "fraction": 1.5})
    with pytest.raises(ValueError, match="form"):
        DataConfig(name="imagefolder", root="x", heldout={"form": "train"})
    config = DataConfig(name="imagefolder", root="x", heldout={"from": "train"})
    assert DataConfig.model_validate(config.model_dump()) == config, "a dumped config loads again"


def test_csv_heldout_from_train(tmp_path: Path) -> None:
    rows = [f"img/{cls}{i}.png,{cls}" for cls in ("cat", "dog") for i in range(10)]
    for row in rows:
        _image(tmp_path / row.split(",")[0])
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(["path,label", *rows]) + "\n")
    bundle = load_dataset(DataConfig(name="csv", manifest=manifest, heldout={"from": "train", "fraction": 0.25}))
    assert [len(bundle.train), len(bundle.heldout), len(bundle.test)] == [12, 4, 4], "80/20, then 25 % of train"
    assert set(bundle.train.paths).isdisjoint(bundle.heldout.paths) and sorted(set(bundle.heldout.labels)) == [0, 1]


# ------------------------------------------------------------------------------------------ shift sets


def test_index_named_shift_folders_map_by_class_index(tmp_path: Path) -> None:
    classes = [f"c{i:02d}" for i in range(12)]
    splits = {"train": dict.fromkeys(classes, 1), "val": {"c00": 1}, "test": {"c00": 1}}
    root = _tree(tmp_path, {**splits, "v2": {"0": 2, "2": 1, "11": 1}})
    assert "class folder " + str(root / "v2" / "0") in _error(root)
    bundle = _load(root, label_maps={"v2": "index"})
    assert bundle.class_groups == {"v2": ((0,), (2,), (11,))}
    assert _labels_by_folder(bundle.shifts["v2"]) == {"0": {0}, "2": {1}, "11": {2}}, "labelled among its groups"
    _image(root / "v2" / "12" / "0.png")
    message = _error(root, label_maps={"v2": "index"})
    assert str(root / "v2" / "12") in message and "0..11" in message
    assert "'nope'" in _error(root, label_maps={"nope": "index"})


def test_shift_folders_renamed_by_a_label_map_file(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data", {**SMALL, "objects": {"kitty": 1, "hound": 2}})
    label_map = tmp_path / "objects.tsv"
    label_map.write_text("kitty\tcat\nhound\tdog\n")
    bundle = _load(root, label_maps={"objects": str(label_map)})
    assert _labels_by_folder(bundle.shifts["objects"]) == {"kitty": {0}, "hound": {1}}
    label_map.write_text("kitty\tcat\n")
    message = _error(root, label_maps={"objects": str(label_map)})
    assert str(root / "objects" / "hound") in message and str(label_map) in message


def test_class_subsets_list_the_classes_a_partial_set_covers(tmp_path: Path) -> None:
    classes = ["a", "b", "c", "d", "e"]
    splits = {"train": dict.fromkeys(classes, 1), "val": {"a": 1}, "test": {"b": 1}}
    root = _tree(tmp_path, {**splits, "partial": {"b": 1, "d": 2}, "full": dict.fromkeys(classes, 1)})
    bundle = _load(root)
    assert bundle.class_groups == {"partial": ((1,), (3,))}
    assert _load(root, ood_val=["partial"]).class_groups == {"partial": ((1,), (3,))}, "ood_val sets are listed too"
    declared = _load(root, class_subsets={"partial": ["c", "b", "d"]})
    assert declared.class_groups == {"partial": ((1,), (2,), (3,))}
    assert _labels_by_folder(declared.shifts["partial"]) == {"b": {0}, "d": {2}}
    assert "has images of d," in _error(root, class_subsets={"partial": ["b"]}), "a declared subset covers the set"
    assert "lists zebra," in _error(root, class_subsets={"partial": ["zebra"]})
    assert "'typo'" in _error(root, class_subsets={"typo": ["a"]})
    assert _load(root, class_subsets={"full": classes}).class_groups == {"partial": ((1,), (3,))}


def test_csv_shift_labels_by_index_and_its_class_subset(tmp_path: Path) -> None:
    for name in ("a", "b"):
        _image(tmp_path / f"{name}.png")
    rows = ["a.png,cat,train", "b.png,dog,train", "a.png,fox,train", "a.png,cat,val", "b.png,dog,test"]
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(["path,label,split", *rows, "a.png,2,v2", "b.png,0,v2", "b.png,dog,night"]) + "\n")
    bundle = load_dataset(DataConfig(name="csv", manifest=manifest, label_maps={"v2": "index"}))
    assert bundle.shifts["v2"].labels == [1, 0] and bundle.shifts["night"].labels == [0]
    assert bundle.class_groups == {"v2": ((0,), (2,)), "night": ((1,),)}


# ------------------------------------------------------------------------------------------- listing


def _age(root: Path, seconds: float = 60.0) -> None:
    """Backdate every folder, like a dataset copied a while ago (a just-changed folder's listing is not cached,
    because a change within the same mtime tick would go unseen)."""
    past = time.time() - seconds
    for folder in [root, *(path for path in root.rglob("*") if path.is_dir())]:
        os.utime(folder, (past, past))


def _record_listings(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every folder listed from now on, by any means (os.scandir backs rglob/walk, os.listdir backs iterdir)."""
    listed: list[Path] = []
    real_scandir, real_listdir = os.scandir, os.listdir

    def scandir(path="."):
        listed.append(Path(path))
        return real_scandir(path)

    def listdir(path="."):
        listed.append(Path(path))
        return real_listdir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "listdir", listdir)
    return listed


def test_listing_is_cached_and_invalidated_by_folder_changes(tmp_path: Path, monkeypatch) -> None:
    root = _tree(tmp_path, {**SMALL, "sketch": {"dog": 2}})
    _image(root / "train" / "cat" / "nested" / "deep.png")
    _age(root)
    listed = _record_listings(monkeypatch)
    first = _load(root)
    assert root / "train" / "cat" in listed, "the first load lists the class folders"
    assert len(list((root / ".soups-cache").glob("*.json"))) == 4, "one cached listing per split folder"

    listed.clear()
    second = _load(root)
    assert listed == [root], "the second load lists only the root (to find shift folders), no split folder"
    assert root / "train" / "cat" / "nested" / "deep.png" in first.train.paths
    assert second.train.paths == first.train.paths
    assert second.shifts["sketch"].paths == first.shifts["sketch"].paths

    added = _image(root / "train" / "cat" / "nested" / "new.png")
    third = _load(root)
    assert third.train.paths == sorted([*first.train.paths[:3], added]) + first.train.paths[3:]
    _age(root)
    _load(root)  # caches the new listing
    (root / "train" / "dog" / "0.png").unlink()
    assert root / "train" / "dog" / "0.png" not in _load(root).train.paths


def test_a_listing_changed_just_now_is_not_cached(tmp_path: Path) -> None:
    root = _tree(tmp_path, SMALL)
    _load(root)
    assert not list((root / ".soups-cache").glob("*.json"))


def test_unwritable_cache_only_warns(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data", SMALL)
    _age(root)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.warns(UserWarning, match="data.cache_dir"):
        bundle = _load(root, cache_dir=blocker / "cache")
    assert len(bundle.train) == 5


def test_loading_opens_no_image(tmp_path: Path, monkeypatch) -> None:
    root = _tree(tmp_path, SMALL)

    def no_open(*args, **kwargs):
        raise AssertionError("an image was opened while loading")

    monkeypatch.setattr(Image, "open", no_open)
    assert len(_load(root).train) == 5


# ----------------------------------------------------------------------------------------- bad files


def test_bad_file_raises_naming_it_when_read(tmp_path: Path) -> None:
    root = _tree(tmp_path, SMALL)
    broken = root / "train" / "cat" / "1.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    train = _load(root).train
    assert train[0][0].mode == "RGB"
    with pytest.raises(DatasetError, match=re.escape(str(broken))):
        train[train.paths.index(broken)]


def test_bad_file_skip_counts_it_and_returns_the_next_readable_item(tmp_path: Path) -> None:
    root = _tree(tmp_path, {**SMALL, "train": {"cat": 2, "dog": 3}})
    broken = root / "train" / "cat" / "1.png"
    broken.write_bytes(b"not an image")
    train = _load(root, bad_files="skip").train
    row = train.paths.index(broken)
    with pytest.warns(UserWarning, match=re.escape(str(broken))):
        image, label = train[row]
    assert train.paths[row + 1].parent.name == "dog" and label == train.labels[row + 1] == 1
    assert image.tobytes() == train[row + 1][0].tobytes(), "the next readable image stands in"
    (root / "train" / "dog" / "2.png").unlink()  # a file that vanished after loading counts too
    with pytest.warns(UserWarning, match="2.png"):
        items = [train[i] for i in range(len(train))]
    assert len(items) == len(train) == 5 and all(image.mode == "RGB" for image, _ in items)
    assert items[-1][1] == 0, "the last item wraps around to the first readable one"
    assert train.bad_files == [broken, root / "train" / "dog" / "2.png"], "each bad file recorded once"
    with pytest.raises(IndexError):
        train[len(train)]
