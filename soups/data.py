"""Dataset registry: every dataset becomes one `DatasetBundle` of (PIL RGB image, int label) datasets.

Fine-tuning, greedy-soup selection and evaluation must agree on which images are train, held-out and test,
so the split is made here, once, seeded by ``DataConfig.seed``; nothing downstream re-splits.

``digits`` -- scikit-learn's bundled 8x8 digits (1797 images, offline).
    Stratified per class, seeded: pretrain 35 %, train 35 %, heldout 10 %, test 20 % (per-class counts
    rounded by largest remainder: 631/628/179/359 images). Pixels (16 grey levels) are scaled to 0..255
    uint8 and upscaled once to 32x32 with bilinear resampling, so a model transform resizes a 32x32 image
    instead of interpolating 8x8 blocks on every access. White ink on black, returned as RGB.
    Shift sets are built once from the test split, each with its own generator seeded by
    (seed, shift number), so they are reproducible and never re-randomised per access:
      ``rotate``  each image rotated by a random 15..30 degrees of random sign (bilinear, black fill);
      ``noise``   additive gaussian pixel noise, sigma 96/255, clipped to 0..255;
      ``blur``    gaussian blur of radius 3 px at 32x32 (3/4 of an original pixel);
      ``invert``  255 - pixel (black ink on white), deliberately hard for a model trained on clean digits.
    On a pixel logistic regression (clean ~0.97) these give roughly rotate 0.6, noise 0.92, blur 0.88,
    invert ~0. ``pretrain`` is kept apart from the other three splits for offline contrastive pretraining.
``imagefolder`` -- ``root/<split>/<class>/<image>`` (images may sit in sub-folders of a class folder); every
    non-hidden top-level folder other than train/val/test is a shift set named after it. Class order: sorted
    sub-folders of train/. Which folder is held-out and which is test depends on ``data.heldout.from``:
      ``val`` (default)  train/ trains, val/ is held-out (selects models), test/ is test;
      ``train``          a stratified, seeded ``data.heldout.fraction`` of each train class is held-out (the
                         paper's 2 % of ImageNet train, 26 images a class) and the rest trains; whichever one
                         of val/ and test/ exists is test, and having both is an error (rename the other).
    Use ``train`` for ImageNet: its val/ is the paper's test set, so holding it out would select soups on the
    test set. Shift folders named by class index (ImageNetV2: 0..999) or by other names are declared in
    ``data.label_maps``.
``csv`` -- ``manifest`` with header ``path,label[,split]``; paths are relative to the manifest's folder
    unless absolute. Class order: sorted labels of the train rows. Split ``train``/``val``/``test`` as the
    folders above; any other split value is a shift set. Without a split column: seeded stratified
    train/val/test 70/10/20 (train/test 80/20 when held-out is carved from train).

Class names and prompt templates default to the folder names (csv labels) and generic photo prompts;
``data.classnames``/``data.templates`` swap in open_clip's ImageNet names and templates or files.
``class_groups`` says, per shift or ood_val set not scored on the model's classes one for one, how it is scored:
a set covering fewer classes than the model has (ImageNet-A/-R: 200) has one singleton group per class it covers
(the evaluator restricts logits to them); a set with a many-to-one label map (``data.label_maps`` JSON, ObjectNet:
113 classes) has, per class of its own, the train classes whose logits are max-pooled into its score. Either way
such a set's labels are its own classes (positions among its groups), as in the official code.
``data.border_crop`` crops pixels off every side of a set's images as they are read (ObjectNet: 2).

Loading never opens an image, so a million files load in the time of a (cached) directory listing; a bad
file surfaces when it is read, as `FileDataset` describes (``data.bad_files``).
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from torch.utils.data import Dataset

from soups.config import DataConfig
from soups.imagefiles import (
    ClassGroups,
    DatasetError,
    FileDataset,
    class_lookup,
    class_subsets,
    folder_set,
    is_pooled_map,
    list_split,
    read_manifest,
    read_pooled_map,
    resolve_classnames,
    resolve_templates,
)

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_TEMPLATES = [
    "a photo of the digit {}.",
    "a handwritten {}.",
    "the number {}.",
    "a blurry low resolution image of the digit {}.",
]
GENERIC_TEMPLATES = [
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a close-up photo of a {}.",
]
DIGITS_FRACTIONS = {"pretrain": 0.35, "train": 0.35, "heldout": 0.10, "test": 0.20}
CSV_FRACTIONS = {"train": 0.70, "val": 0.10, "test": 0.20}
CSV_FRACTIONS_NO_VAL = {"train": 0.80, "test": 0.20}
DIGITS_SIZE = 32
CORE_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DatasetBundle:
    """Everything a run needs from one dataset, split once so all stages agree on the same images."""

    name: str
    classnames: list[str]
    templates: list[str]
    train: Dataset
    heldout: Dataset
    test: Dataset
    shifts: dict[str, Dataset]
    pretrain: Dataset | None
    ood_val: dict[str, Dataset] = field(default_factory=dict)
    """Shift sets that may select models (``data.ood_val``): never built from test images."""
    class_groups: dict[str, ClassGroups] = field(default_factory=dict)
    """Per shift or ood_val set not scored on the model's classes one for one: per class of the set (its labels
    are positions in this), the model classes whose max logit scores it (singletons for a set covering some of
    the classes, ImageNet-A/-R; several for a many-to-one label map, ObjectNet). Other sets are absent."""


class ArrayDataset(Dataset):
    """Greyscale uint8 images kept as one array; PIL images are built per item to stay small and fast.

    ``indices`` are the rows of the source dataset, so splits can be checked for overlap.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
        self.images, self.labels, self.indices = images, labels, indices

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[i]).convert("RGB"), int(self.labels[i])

    def fingerprint(self) -> str:
        """sha256 of the pixels and labels: what its decoded copies are keyed by (`soups.decoded`)."""
        digest = hashlib.sha256(f"array {self.images.shape} {self.images.dtype}".encode())
        digest.update(np.ascontiguousarray(self.images).tobytes())
        digest.update(np.asarray(self.labels, dtype="<i8").tobytes())
        return digest.hexdigest()


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split indices per class by largest remainder, so every split mirrors the class balance exactly."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        exact = np.asarray(fractions) * len(members)
        counts = np.floor(exact).astype(int)
        short = len(members) - counts.sum()
        counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
        for part, chunk in zip(parts, np.split(members, np.cumsum(counts)[:-1]), strict=True):
            part.append(chunk)
    return [np.sort(np.concatenate(part)) for part in parts]


# ---------------------------------------------------------------------------------------------- digits


def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 0..16 8x8 digits and targets, read straight from scikit-learn's bundled file when present.

    Importing ``sklearn.datasets`` takes over a second; the file it parses is the same, so read it directly
    and fall back to ``load_digits`` only if a future scikit-learn moves the file.
    """
    spec = importlib.util.find_spec("sklearn")
    folders = list(spec.submodule_search_locations or []) if spec else []
    bundled = [Path(f) / "datasets" / "data" / "digits.csv.gz" for f in folders]
    if bundled and bundled[0].is_file():
        table = np.loadtxt(bundled[0], delimiter=",")
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    raw = load_digits()
    return raw.images, raw.target.astype(np.int64)


@lru_cache(maxsize=1)
def _digit_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Decode and upscale the digits once per process; later loads only index into the cached arrays."""
    raw, labels = _raw_digits()
    small = np.clip(np.rint(raw * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    size = (DIGITS_SIZE, DIGITS_SIZE)
    images = np.stack([np.asarray(Image.fromarray(im).resize(size, Image.Resampling.BILINEAR)) for im in small])
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def _rotate(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    angles = rng.uniform(15.0, 30.0, len(images)) * rng.choice([-1.0, 1.0], len(images))
    return np.stack(
        [
            np.asarray(Image.fromarray(im).rotate(a, resample=Image.Resampling.BILINEAR, fillcolor=0))
            for im, a in zip(images, angles, strict=True)
        ]
    )


def _noise(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(images + rng.normal(0.0, 96.0, images.shape), 0, 255).astype(np.uint8)


def _blur(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    blur = ImageFilter.GaussianBlur(radius=3.0)
    return np.stack([np.asarray(Image.fromarray(im).filter(blur)) for im in images])


def _invert(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 255 - images


DIGIT_SHIFTS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "rotate": _rotate,
    "noise": _noise,
    "blur": _blur,
    "invert": _invert,
}


def load_digits_bundle(config: DataConfig) -> DatasetBundle:
    """Digits with a pretrain split and generated shifts: the offline, CPU-sized end-to-end benchmark."""
    images, labels = _digit_arrays()
    split_idx = stratified_split(labels, list(DIGITS_FRACTIONS.values()), config.seed)
    parts = dict(zip(DIGITS_FRACTIONS, split_idx, strict=True))
    splits = {name: ArrayDataset(images[idx], labels[idx], idx) for name, idx in parts.items()}
    test, heldout = parts["test"], parts["heldout"]
    shifts: dict[str, Dataset] = {
        name: ArrayDataset(make(images[test], np.random.default_rng([config.seed, k])), labels[test], test)
        for k, (name, make) in enumerate(DIGIT_SHIFTS.items())
    }
    unknown = sorted(set(config.ood_val) - set(DIGIT_SHIFTS))
    if unknown:
        raise DatasetError(f"data.ood_val names {unknown}; digits can build: {', '.join(DIGIT_SHIFTS)}")
    ood_val: dict[str, Dataset] = {}  # the same transforms on held-out images, with their own random draws
    for k, name in enumerate(config.ood_val):
        shifted = DIGIT_SHIFTS[name](images[heldout], np.random.default_rng([config.seed, 1000 + k]))
        ood_val[name] = ArrayDataset(shifted, labels[heldout], heldout)
    return DatasetBundle(
        name="digits",
        classnames=resolve_classnames(config.classnames, list(DIGIT_NAMES), "digits"),
        templates=resolve_templates(config.templates, DIGIT_TEMPLATES),
        train=splits["train"],
        heldout=splits["heldout"],
        test=splits["test"],
        shifts=shifts,
        pretrain=splits["pretrain"],
        ood_val=ood_val,
    )


# ------------------------------------------------------------------------------------ files on disk


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DatasetError(f"{what} folder {path} does not exist; create it or fix the config path")


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _test_split(config: DataConfig, present: Collection[str], where: str) -> str:
    """Which split is test: ``test`` while val is held-out; once held-out comes from train, whichever of val and
    test exists (ImageNet ships its test set as val). Both is ambiguous, so an error rather than a guess."""
    if config.heldout.source == "val":
        return "test"
    found = [split for split in ("val", "test") if split in present]
    if len(found) == 1:
        return found[0]
    fix = "rename the other one (it becomes a shift set)" if found else "add it"
    raise DatasetError(
        f"the {where} include {'both val and test' if found else 'neither val nor test'}; with data.heldout.from train "
        f"exactly one of val and test is the test split: {fix}, or use data.heldout.from val"
    )


def _required_splits(config: DataConfig, test: str) -> tuple[str, ...]:
    return CORE_SPLITS if config.heldout.source == "val" else ("train", test)


def _arrange(
    sets: dict[str, FileDataset], test: str, config: DataConfig, where: str
) -> tuple[FileDataset, FileDataset, FileDataset]:
    """(train, held-out, test): val as held-out, or a stratified, seeded share of every train class."""
    if config.heldout.source == "val":
        return sets["train"], sets["val"], sets["test"]
    if config.heldout.mask is not None:
        held_rows = heldout_mask(config.heldout.mask, len(sets["train"]), where)
        keep, held = np.flatnonzero(~held_rows), np.flatnonzero(held_rows)
        return sets["train"].subset(keep), sets["train"].subset(held), sets[test]
    fraction = config.heldout.fraction
    keep, held = stratified_split(np.asarray(sets["train"].labels), [1 - fraction, fraction], config.seed)
    if len(held) == 0:
        raise DatasetError(f"data.heldout.fraction {fraction} holds out no train image of {where}; raise it")
    return sets["train"].subset(keep), sets["train"].subset(held), sets[test]


def _check_label_maps(config: DataConfig, names: Sequence[str], where: str) -> None:
    unknown = sorted(set(config.label_maps) - set(names))
    if unknown:
        raise DatasetError(f"data.label_maps names {unknown}, which are not among the {where}: {', '.join(names)}")


def load_imagefolder_bundle(config: DataConfig) -> DatasetBundle:
    """Folders on disk: train plus held-out/test folders (see the module docstring) and named shift folders.

    Listings are cached under ``data.cache_dir`` (default ``<root>/.soups-cache``), so a second load of
    ImageNet stats ~2000 folders instead of listing 1.3M files.
    """
    if config.root is None:
        raise DatasetError("data.root is not set; point it at a folder with train/ val/ test/")
    root = Path(config.root)
    _require_dir(root, "imagefolder root")
    folders = [d.name for d in _visible_dirs(root)]
    test = _test_split(config, folders, f"folders of {root}")
    for split in _required_splits(config, test):
        _require_dir(root / split, f"{split} split")
    _check_label_maps(config, folders, f"folders of {root}")
    cache_dir = config.cache_dir or root / ".soups-cache"
    listings = {name: list_split(root / name, cache_dir) for name in ["train", *(f for f in folders if f != "train")]}
    keys = list(listings["train"].classes)
    if not keys:
        raise DatasetError(f"split folder {root / 'train'} has no class sub-folders; add one per class")
    classnames = resolve_classnames(config.classnames, keys, str(root / "train"))
    lookups = {name: class_lookup(keys, config.label_maps.get(name), classnames) for name in listings}
    built = {
        name: folder_set(listing, lookups[name], config.bad_files, name == "train")
        for name, listing in listings.items()
    }
    sets = {name: dataset for name, (dataset, _) in built.items()}
    covered = {name: classes for name, (_, classes) in built.items()}
    where = (str(root / "train"), f"folders of {root}")
    return _file_bundle("imagefolder", config, sets, covered, test, keys, classnames, where)


def heldout_mask(path: Path, train_files: int, where: str) -> np.ndarray:
    """The official-style held-out mask as a boolean row mask over the train split, checked: 1-D, 0/1 or
    boolean, one entry per train file (read without unpickling anything)."""
    try:
        mask = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DatasetError(f"data.heldout.mask {path} cannot be read as .npy ({err}); give a 0/1 .npy file") from err
    if mask.ndim != 1 or not (mask.dtype == bool or np.isin(mask, (0, 1)).all()):
        raise DatasetError(f"data.heldout.mask {path} must be a 1-D array of 0/1 or booleans, got shape {mask.shape}")
    if len(mask) != train_files:
        raise DatasetError(
            f"data.heldout.mask {path} has {len(mask)} entries but {where} has {train_files} train images; the mask "
            "must cover the train images in ImageFolder order, one entry each (the same train folder it was made for)"
        )
    held = mask.astype(bool)
    if not held.any() or held.all():
        raise DatasetError(
            f"data.heldout.mask {path} holds out {int(held.sum())} of {train_files} images; mark some, not all, with 1"
        )
    return held


def _file_bundle(
    name: str,
    config: DataConfig,
    sets: dict[str, FileDataset],
    covered: dict[str, set[int]],
    test: str,
    keys: list[str],
    classnames: list[str],
    where: tuple[str, str],
) -> DatasetBundle:
    """The bundle of a dataset of image files (folders or a manifest's rows): its sets border-cropped as asked,
    its core splits arranged, the other sets split into shifts and ood-val sets, with how each is scored
    (`class_groups`; such a set relabelled to its own classes). ``where``: (the source, how messages name its
    sets)."""
    source, sets_of = where
    cropped = sorted(set(config.border_crop) - set(sets))
    if cropped:
        raise DatasetError(f"data.border_crop names {cropped}, which are not among the {sets_of}: {', '.join(sets)}")
    sets = {
        split: ds.cropped(config.border_crop[split]) if split in config.border_crop else ds
        for split, ds in sets.items()
    }
    train, heldout, test_set = _arrange(sets, test, config, source)
    extra = {split: dataset for split, dataset in sets.items() if split not in CORE_SPLITS}
    pooled = {
        split: tuple(read_pooled_map(config.label_maps[split], keys, classnames).values())
        for split in extra
        if is_pooled_map(config.label_maps.get(split))
    }
    subsets = class_subsets(
        {split: covered[split] for split in extra if split not in pooled}, keys, config.class_subsets, sets_of
    )
    for split, classes in subsets.items():  # scored among these classes only: labelled by position among them
        position = {label: k for k, label in enumerate(classes)}
        extra[split] = extra[split].relabelled([position[label] for label in extra[split].labels])
    groups = {**{split: tuple((label,) for label in classes) for split, classes in subsets.items()}, **pooled}
    shifts, ood_val = _set_aside_ood_val(extra, config, sets_of)
    return DatasetBundle(
        name=name,
        classnames=classnames,
        templates=resolve_templates(config.templates, GENERIC_TEMPLATES),
        train=train,
        heldout=heldout,
        test=test_set,
        shifts=shifts,
        pretrain=None,
        ood_val=ood_val,
        class_groups=groups,
    )


def _set_aside_ood_val(
    extra: dict[str, Dataset], config: DataConfig, where: str
) -> tuple[dict[str, Dataset], dict[str, Dataset]]:
    """Split the extra sets into reported shifts and the ood-validation sets named by ``data.ood_val``."""
    missing = sorted(set(config.ood_val) - set(extra))
    if missing:
        raise DatasetError(f"data.ood_val names {missing}, which are not among the {where}: {', '.join(extra)}")
    shifts = {name: ds for name, ds in extra.items() if name not in config.ood_val}
    return shifts, {name: extra[name] for name in config.ood_val}


def load_csv_bundle(config: DataConfig) -> DatasetBundle:
    """A manifest of labelled images; a split column pins the split, otherwise a seeded stratified one."""
    if config.manifest is None:
        raise DatasetError("data.manifest is not set; point it at a CSV with columns path,label[,split]")
    manifest = Path(config.manifest)
    rows, has_split = read_manifest(manifest)
    if not has_split and config.heldout.mask is not None:
        raise DatasetError(
            f"data.heldout.mask indexes the train rows of {manifest} in order, but it has no split column, so which "
            "rows train would be drawn at random; add a split column (train rows, and val or test)"
        )
    if not has_split:
        fractions = CSV_FRACTIONS if config.heldout.source == "val" else CSV_FRACTIONS_NO_VAL
        parts = stratified_split(np.array([row["label"] for row in rows]), list(fractions.values()), config.seed)
        for split, idx in zip(fractions, parts, strict=True):
            for i in idx:
                rows[i]["split"] = split
    where = f"split values of {manifest}"
    present = list(dict.fromkeys(row["split"] for row in rows))
    test = _test_split(config, present, where)
    _check_label_maps(config, present, where)
    required = _required_splits(config, test)
    keys = sorted({row["label"] for row in rows if row["split"] == "train"})
    if not keys:
        raise DatasetError(f"manifest {manifest} has no 'train' rows; add some (they define the classes)")
    classnames = resolve_classnames(config.classnames, keys, str(manifest))
    lookups = {split: class_lookup(keys, config.label_maps.get(split), classnames) for split in present}
    grouped: dict[str, tuple[list[Path], list[int]]] = {split: ([], []) for split in required}
    for line, row in enumerate(rows, start=2):
        path = Path(row["path"])
        path = path if path.is_absolute() else manifest.parent / path
        where_row = f"manifest {manifest} line {line}: label {row['label']!r} of {path}"
        label = lookups[row["split"]](row["label"], where_row)
        paths, labels = grouped.setdefault(row["split"], ([], []))
        paths.append(path)
        labels.append(label)
    for split in required:
        if not grouped[split][0]:
            raise DatasetError(
                f"manifest {manifest} has no {split!r} rows; add some (or more rows per class for the automatic split)"
            )
    sets = {split: FileDataset(paths, labels, config.bad_files) for split, (paths, labels) in grouped.items()}
    covered = {split: set(dataset.labels) for split, dataset in sets.items()}
    return _file_bundle("csv", config, sets, covered, test, keys, classnames, (str(manifest), where))


DATASETS: dict[str, Callable[[DataConfig], DatasetBundle]] = {
    "digits": load_digits_bundle,
    "imagefolder": load_imagefolder_bundle,
    "csv": load_csv_bundle,
}


def load_dataset(config: DataConfig) -> DatasetBundle:
    """Look the dataset up in `DATASETS`; the only entry point the rest of the platform uses."""
    loader = DATASETS.get(config.name)
    if loader is None:
        raise DatasetError(f"unknown dataset {config.name!r}; known datasets: {', '.join(sorted(DATASETS))}")
    return loader(config)
