"""The paper's protocol in the data and evaluation layers: the official held-out mask indexes the train files in
torchvision ImageFolder order; ObjectNet-like sets are scored on logits max-pooled over each of their classes'
train classes (a `; `-joined JSON map) with a border cropped off every image; evaluation runs in the precision
the config names, on any device."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torchvision.datasets import ImageFolder

from soups.config import ConfigError, DataConfig, load_config
from soups.cooking import _class_groups
from soups.data import DatasetError, load_dataset
from soups.evaluate import Evaluator, evaluate, evaluation_splits, logits_of
from soups.images import ImageTensors, Preprocess, StreamedImages, decode
from soups.models import empty_classifier

WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]
NAMES = ["tench", "goldfish", "great white shark", "tiger shark"]
MAGENTA, GREEN = (255, 0, 255), (0, 200, 0)
IDENTITY = Preprocess(8, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
"""No normalisation: a model sees pixel/255, so a test can read which image it got."""


def _png(path: Path, colour: tuple[int, int, int] = (90, 90, 90), size: int = 8, frame: int = 0) -> Path:
    pixels = np.zeros((size + 2 * frame, size + 2 * frame, 3), dtype=np.uint8)
    pixels[:] = MAGENTA
    pixels[frame : frame + size, frame : frame + size] = colour
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")
    return path


def _imagefolder(root: Path, per_class: int, test: bool = False) -> Path:
    """ImageNet's shape in small: WordNet-id train folders and val/ (plus test/, so val can be held-out)."""
    for k, wnid in enumerate(WNIDS):
        for i in range(per_class):
            _png(root / "train" / wnid / f"{wnid}_{i}.JPEG", (10 * k, i, 0))
        for split in ("val", "test") if test else ("val",):
            _png(root / split / wnid / "v.png")
    return root


def _classnames(root: Path) -> Path:
    path = root / "classnames.txt"
    path.write_text("".join(f"{wnid}\t{name}\n" for wnid, name in zip(WNIDS, NAMES, strict=True)))
    return path


def _data(root: Path, **fields) -> DataConfig:
    return DataConfig(name="imagefolder", root=root, **fields)


def _error(config: DataConfig) -> str:
    with pytest.raises(DatasetError) as info:
        load_dataset(config)
    return str(info.value)


# --------------------------------------------------------------------------------- the held-out mask


def test_train_files_are_listed_in_torchvision_imagefolder_order(tmp_path):
    """Nested folders, a folder's own files after sub-folder names, '-' sorting before '/', case, numbers and a
    file type ImageFolder does not accept: the order an official mask indexes is ImageFolder's own."""
    root = _imagefolder(tmp_path / "in", per_class=1, test=True)
    cls = root / "train" / WNIDS[1]
    for name in ["z.png", "A.png", "a.png", "10.png", "9.png", "sub/x.png", "sub-2/y.png", "sub/deeper/w.png"]:
        _png(cls / name)
    Image.new("RGB", (4, 4)).save(cls / "animated.gif")  # ImageFolder takes no .gif
    ours = load_dataset(_data(root)).train
    theirs = ImageFolder(str(root / "train")).samples
    assert [str(path) for path in ours.paths] == [path for path, _ in theirs]
    assert ours.labels == [label for _, label in theirs]
    assert not any(path.suffix == ".gif" for path in ours.paths)


def test_a_mask_holds_out_its_26_ones_per_class_in_imagefolder_order(tmp_path):
    root = _imagefolder(tmp_path / "in", per_class=30)
    rng = np.random.default_rng(0)
    mask = np.zeros(len(WNIDS) * 30, dtype=np.uint8)
    for k in range(len(WNIDS)):
        mask[k * 30 + rng.choice(30, 26, replace=False)] = 1
    np.save(tmp_path / "imagenet_98_idxs.npy", mask)
    bundle = load_dataset(_data(root, heldout={"mask": str(tmp_path / "imagenet_98_idxs.npy")}))
    order = [path for path, _ in ImageFolder(str(root / "train")).samples]
    assert np.bincount(bundle.heldout.labels).tolist() == [26] * len(WNIDS)
    assert [str(p) for p in bundle.heldout.paths] == [order[i] for i in np.flatnonzero(mask)]
    assert [str(p) for p in bundle.train.paths] == [order[i] for i in np.flatnonzero(mask == 0)]
    assert [p.parent.parent.name for p in bundle.test.paths] == ["val"] * len(WNIDS), "val/ is the test split"


def test_a_mask_of_another_length_is_refused_in_one_line_naming_both_counts(tmp_path):
    root = _imagefolder(tmp_path / "in", per_class=3)
    np.save(tmp_path / "short.npy", np.ones(11, dtype=bool))
    message = _error(_data(root, heldout={"mask": str(tmp_path / "short.npy")}))
    assert "has 11 entries" in message and "has 12 train images" in message and "\n" not in message
    np.save(tmp_path / "grid.npy", np.ones((3, 4), dtype=np.uint8))
    assert "1-D array of 0/1" in _error(_data(root, heldout={"mask": str(tmp_path / "grid.npy")}))


def test_csv_masks_index_the_manifests_train_rows_in_order_and_need_a_split_column(tmp_path):
    rows = [f"{_png(tmp_path / f'{i}.png')},{'cat' if i % 2 else 'dog'},train" for i in range(6)]
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(["path,label,split", *rows, f"{_png(tmp_path / 't.png')},cat,test"]) + "\n")
    np.save(tmp_path / "mask.npy", np.array([0, 1, 0, 0, 1, 0], dtype=np.uint8))
    bundle = load_dataset(DataConfig(name="csv", manifest=manifest, heldout={"mask": str(tmp_path / "mask.npy")}))
    assert [p.name for p in bundle.heldout.paths] == ["1.png", "4.png"]
    assert [p.name for p in bundle.train.paths] == ["0.png", "2.png", "3.png", "5.png"]
    plain = tmp_path / "plain.csv"
    plain.write_text("\n".join(["path,label", *(",".join(row.split(",")[:2]) for row in rows)]) + "\n")
    with pytest.raises(DatasetError, match="has no split column"):
        load_dataset(DataConfig(name="csv", manifest=plain, heldout={"mask": str(tmp_path / "mask.npy")}))


# -------------------------------------------------------------------------------- pooled label maps


class ByPixel(nn.Module):
    """Logits looked up by the first pixel of each image: row ``round(255 * x[:, 0, 0, 0])`` of ``table``."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.table[(images[:, 0, 0, 0] * 255).round().long()]


def _tagged(count: int) -> torch.Tensor:
    """uint8 images whose first pixel is their row number."""
    images = torch.zeros(count, 3, 8, 8, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(count, dtype=torch.uint8)
    return images


def test_pooled_scoring_takes_each_groups_max_logit_where_averaging_or_first_members_would_not():
    groups = [[0, 1], [2, 3]]  # two classes of the set, each pooling two model classes
    table = torch.tensor([[4.0, -10.0, 3.0, 3.0], [1.0, 6.0, 5.0, 0.0], [0.0, 3.0, 4.0, 4.0]])
    labels = torch.tensor([0, 0, 1])
    data = ImageTensors(_tagged(3), labels)
    model = ByPixel(table)
    mean_pooled = torch.stack([table[:, g].mean(1) for g in groups], 1).argmax(1)
    first_members = table[:, [0, 2]].argmax(1)
    assert mean_pooled.tolist() == [1, 0, 1] and first_members.tolist() == [0, 1, 1], "the naive ways differ"
    metrics = Evaluator(model, {"objectnet": data}, IDENTITY, class_groups={"objectnet": groups}).metrics("objectnet")
    assert metrics.hits.tolist() == [True, True, True] and metrics.accuracy == 1.0
    pooled = torch.stack([table[:, g].amax(1) for g in groups], 1)
    assert metrics.loss == pytest.approx(float(F.cross_entropy(pooled, labels)))
    assert torch.equal(logits_of(model, data, IDENTITY, groups=groups), pooled), "logits are the pooled ones"
    assert evaluate(model, data, IDENTITY, groups=[[0], [2]]).hits.tolist() == [True, False, True], (
        "singletons restrict"
    )


def _objectnet(root: Path, mapping: dict[str, str]) -> Path:
    """A folder per class of the map; image k of each is drawn in grey level k (what ByPixel reads)."""
    for folder in mapping:
        for k in range(3):
            _png(root / "objectnet" / folder / f"{k}.png", (k, k, k), frame=2)
    path = root / "objectnet_to_imagenet_1k.json"
    path.write_text(json.dumps(mapping))
    return path


def test_a_json_label_map_gives_the_set_its_own_classes_pooling_train_classes_named_either_way(tmp_path):
    root = _imagefolder(tmp_path / "in", per_class=2, test=True)
    mapping = {"sharks": "great white shark; n01491361", "fish": "tench; goldfish"}
    label_map = _objectnet(root, mapping)
    config = _data(
        root,
        classnames=str(_classnames(root)),
        label_maps={"objectnet": str(label_map)},
        border_crop={"objectnet": 2},
    )
    bundle = load_dataset(config)
    assert bundle.class_groups == {"objectnet": ((0, 1), (2, 3))}, "folders sorted: fish 0, sharks 1"
    shift = bundle.shifts["objectnet"]
    assert {(p.parent.name, label) for p, label in zip(shift.paths, shift.labels, strict=True)} == {
        ("fish", 0),
        ("sharks", 1),
    }
    # Image k of each folder: k=0 and 2 favour the right class only through the max, k=1 through the mean.
    table = torch.tensor([[9.0, -9.0, 5.0, 5.0], [0.0, 1.0, 2.0, 2.0], [-9.0, 9.0, 5.0, 5.0]])
    splits, shifts = evaluation_splits(bundle, IDENTITY)
    evaluator = Evaluator(ByPixel(table), splits, IDENTITY, shifts=shifts, class_groups=_class_groups(bundle))
    hits = evaluator.metrics("objectnet").hits.tolist()
    assert hits == [True, False, True, False, True, False], "fish: max-pooled wins on 0 and 2; sharks: on 1 only"
    assert "test" not in evaluator.class_groups and "heldout" not in evaluator.class_groups


def test_json_label_maps_refuse_unknown_names_unmapped_folders_and_overlapping_settings(tmp_path):
    root = _imagefolder(tmp_path / "in", per_class=2, test=True)
    label_map = _objectnet(root, {"fish": "tench; carp; n099", "sharks": "tiger shark"})
    message = _error(_data(root, classnames=str(_classnames(root)), label_maps={"objectnet": str(label_map)}))
    assert "carp, n099" in message and str(label_map) in message
    label_map.write_text(json.dumps({"fish": "tench"}))
    message = _error(_data(root, classnames=str(_classnames(root)), label_maps={"objectnet": str(label_map)}))
    assert str(root / "objectnet" / "sharks") in message and "has no entry" in message
    with pytest.raises(ConfigError, match="already says which train classes"):
        load_config(
            None,
            {
                "data.name": "imagefolder",
                "data.root": str(root),
                "data.label_maps": {"objectnet": str(label_map)},
                "data.class_subsets": {"objectnet": ["n01440764"]},
            },
        )
    with pytest.raises(ConfigError, match="only shift and ood_val sets"):
        load_config(None, {"data.name": "imagefolder", "data.root": str(root), "data.label_maps": {"test": "m.json"}})


# ------------------------------------------------------------------------------------- border crop


def _magenta(images: torch.Tensor) -> int:
    """How many pixels of uint8 [B,3,H,W] images are (nearly) the frame's magenta."""
    r, g, b = images[:, 0].int(), images[:, 1].int(), images[:, 2].int()
    return int(((r > 200) & (g < 60) & (b > 200)).sum())


def test_the_border_crop_removes_every_frame_pixel_decoded_or_streamed(tmp_path):
    root = _imagefolder(tmp_path / "in", per_class=1, test=True)
    for k in range(2):
        _png(root / "framed" / WNIDS[k] / "0.png", GREEN, size=8, frame=2)
    framed = load_dataset(_data(root)).shifts["framed"]
    uncropped = decode(framed, Preprocess(12, (0.0,) * 3, (1.0,) * 3)).images
    assert framed[0][0].size == (12, 12) and _magenta(uncropped) == 2 * (12 * 12 - 8 * 8), "uncropped: frame kept"
    bundle = load_dataset(_data(root, border_crop={"framed": 2}))
    image, _ = bundle.shifts["framed"][0]
    assert image.size == (8, 8) and image.getcolors() == [(64, GREEN)]
    decoded = decode(bundle.shifts["framed"], IDENTITY).images
    streamed = torch.cat([images for images, _ in StreamedImages(bundle.shifts["framed"], IDENTITY, 0).batches(4)])
    assert _magenta(decoded) == _magenta(streamed) == 0 and torch.equal(decoded, streamed)
    assert "'typo'" in _error(_data(root, border_crop={"typo": 2}))
    with pytest.raises(DatasetError, match="too small to crop"):
        load_dataset(_data(root, border_crop={"framed": 6})).shifts["framed"][0]


# ---------------------------------------------------------------------------------------- precision


def test_eval_precision_applies_on_cpu_too_and_bf16_moves_logits_and_loss():
    torch.manual_seed(0)
    model = empty_classifier("soups-vit-tiny", 10, "cpu")
    preprocess = Preprocess.of(model)
    images = torch.randint(0, 256, (8, 3, preprocess.size, preprocess.size), dtype=torch.uint8)
    data = ImageTensors(images, torch.arange(8) % 10)
    fp32 = logits_of(model, data, preprocess)
    assert torch.equal(fp32, logits_of(model, data, preprocess, precision="fp32")), "fp32 is the default"
    bf16 = logits_of(model, data, preprocess, precision="bf16")
    assert not torch.equal(fp32, bf16) and (fp32 - bf16).abs().max() < 0.1 * fp32.abs().max()
    losses = {
        p: Evaluator(model, {"test": data}, preprocess, precision=p).metrics("test").loss for p in ("fp32", "bf16")
    }
    assert losses["fp32"] != losses["bf16"]
    assert losses["fp32"] == pytest.approx(float(F.cross_entropy(fp32, data.labels)), rel=1e-6)
