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
``imagefolder`` -- ``root/{train,val,test}/<class>/<image>``; ``val`` is the held-out split and every other
    non-hidden top-level folder is a shift set named after it. Class names: sorted sub-folders of train/.
``csv`` -- ``manifest`` with header ``path,label[,split]``; paths are relative to the manifest's folder
    unless absolute. Class names: sorted labels of the train rows. Split ``train``/``val``/``test``; any
    other split value is a shift set. Without a split column: seeded stratified train/val/test 70/10/20.

For imagefolder and csv every image is opened and ``verify()``-ed by PIL inside `load_dataset`, so a
corrupt or missing file fails before training rather than hours into it; this reads each file's header
once (seconds for thousands of small images). Pixels are decoded lazily in ``__getitem__``.
"""

from __future__ import annotations

import csv
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from torch.utils.data import Dataset

from soups.config import DataConfig

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
DIGITS_SIZE = 32
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
CORE_SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
    """A bad dataset input; the message names the offending file or folder and what to do about it."""


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


class FileDataset(Dataset):
    """Image files decoded lazily, so loading a bundle costs a directory scan, not a decode of every pixel."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int]) -> None:
        self.paths, self.labels = list(paths), list(labels)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        with Image.open(self.paths[i]) as image:
            return image.convert("RGB"), self.labels[i]


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
        classnames=list(DIGIT_NAMES),
        templates=list(DIGIT_TEMPLATES),
        train=splits["train"],
        heldout=splits["heldout"],
        test=splits["test"],
        shifts=shifts,
        pretrain=splits["pretrain"],
        ood_val=ood_val,
    )


# ------------------------------------------------------------------------------------ files on disk


def _verify_image(path: Path, where: str) -> None:
    """Fail at load time, naming the file, rather than inside a DataLoader worker mid-training."""
    if not path.is_file():
        raise DatasetError(f"image file {path} (listed in {where}) does not exist; fix the path or remove it")
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, struct.error, ...) for bad files
        raise DatasetError(f"image file {path} cannot be read as an image ({err}); replace or remove it") from err


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DatasetError(f"{what} folder {path} does not exist; create it or fix the config path")


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan_split(folder: Path, classnames: list[str]) -> FileDataset:
    """Collect and verify one split folder's images, rejecting classes the model has no output for."""
    loose = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if loose:
        raise DatasetError(f"image {loose[0]} sits directly in {folder}; move it into a class sub-folder")
    index = {name: i for i, name in enumerate(classnames)}
    paths: list[Path] = []
    labels: list[int] = []
    for class_dir in _visible_dirs(folder):
        if class_dir.name not in index:
            raise DatasetError(
                f"class folder {class_dir} is not a class of the train split ({', '.join(classnames)}); "
                "rename it or add the class to train/"
            )
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files and folder.name == "train":
            raise DatasetError(f"class folder {class_dir} has no images; add images or remove the folder")
        for path in files:
            _verify_image(path, str(folder))
        paths += files
        labels += [index[class_dir.name]] * len(files)
    if not paths:
        raise DatasetError(f"split folder {folder} contains no images in class sub-folders; add some")
    return FileDataset(paths, labels)


def load_imagefolder_bundle(config: DataConfig) -> DatasetBundle:
    """Folders on disk: train/val/test plus any extra top-level folder as a named distribution shift."""
    if config.root is None:
        raise DatasetError("data.root is not set; point it at a folder with train/ val/ test/")
    root = Path(config.root)
    _require_dir(root, "imagefolder root")
    for split in CORE_SPLITS:
        _require_dir(root / split, f"{split} split")
    classnames = [p.name for p in _visible_dirs(root / "train")]
    if not classnames:
        raise DatasetError(f"split folder {root / 'train'} has no class sub-folders; add one per class")
    splits = {split: _scan_split(root / split, classnames) for split in CORE_SPLITS}
    extra = {d.name: _scan_split(d, classnames) for d in _visible_dirs(root) if d.name not in CORE_SPLITS}
    shifts, ood_val = _set_aside_ood_val(extra, config, f"folders of {root}")
    return DatasetBundle(
        name="imagefolder",
        classnames=classnames,
        templates=list(GENERIC_TEMPLATES),
        train=splits["train"],
        heldout=splits["val"],
        test=splits["test"],
        shifts=shifts,
        pretrain=None,
        ood_val=ood_val,
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


def _read_manifest(manifest: Path) -> tuple[list[dict[str, str]], bool]:
    """Rows with stripped fields and whether a split column exists; unknown columns are typos, so errors."""
    if not manifest.is_file():
        raise DatasetError(f"manifest {manifest} does not exist; fix data.manifest")
    with manifest.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        if not {"path", "label"} <= set(columns) or not set(columns) <= {"path", "label", "split"}:
            raise DatasetError(f"manifest {manifest} has columns {columns}; the header must be path,label[,split]")
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    for line, row in enumerate(rows, start=2):
        empty = [c for c in columns if not row.get(c)]
        if empty:
            raise DatasetError(f"manifest {manifest} line {line} has an empty {empty[0]!r}; fill it in")
    if not rows:
        raise DatasetError(f"manifest {manifest} has no rows; list at least one image per split")
    return rows, "split" in columns


def load_csv_bundle(config: DataConfig) -> DatasetBundle:
    """A manifest of labelled images; a split column pins the split, otherwise a seeded stratified one."""
    if config.manifest is None:
        raise DatasetError("data.manifest is not set; point it at a CSV with columns path,label[,split]")
    manifest = Path(config.manifest)
    rows, has_split = _read_manifest(manifest)
    if not has_split:
        labels = np.array([row["label"] for row in rows])
        parts = stratified_split(labels, list(CSV_FRACTIONS.values()), config.seed)
        for split, idx in zip(CSV_FRACTIONS, parts, strict=True):
            for i in idx:
                rows[i]["split"] = split
    classnames = sorted({row["label"] for row in rows if row["split"] == "train"})
    index = {name: i for i, name in enumerate(classnames)}
    grouped: dict[str, tuple[list[Path], list[int]]] = {split: ([], []) for split in CORE_SPLITS}
    for line, row in enumerate(rows, start=2):
        path = Path(row["path"])
        path = path if path.is_absolute() else manifest.parent / path
        if row["label"] not in index:
            raise DatasetError(
                f"manifest {manifest} line {line}: label {row['label']!r} of {path} is not a train class "
                f"({', '.join(classnames) or 'no train rows'}); add train images of it or fix the label"
            )
        _verify_image(path, f"manifest {manifest} line {line}")
        paths, labels = grouped.setdefault(row["split"], ([], []))
        paths.append(path)
        labels.append(index[row["label"]])
    for split in CORE_SPLITS:
        if not grouped[split][0]:
            raise DatasetError(
                f"manifest {manifest} has no {split!r} rows; add some (or more rows per class for the automatic split)"
            )
    datasets = {split: FileDataset(paths, labels) for split, (paths, labels) in grouped.items()}
    extra = {split: ds for split, ds in datasets.items() if split not in CORE_SPLITS}
    shifts, ood_val = _set_aside_ood_val(extra, config, f"split values of {manifest}")
    return DatasetBundle(
        name="csv",
        classnames=classnames,
        templates=list(GENERIC_TEMPLATES),
        train=datasets["train"],
        heldout=datasets["val"],
        test=datasets["test"],
        shifts=shifts,
        pretrain=None,
        ood_val=ood_val,
    )


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
