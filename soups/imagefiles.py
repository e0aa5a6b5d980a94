"""Image files on disk: a lazily checked dataset, cached folder listings, and the names of their classes.

ImageNet's train split is 1.28M files in 1000 class folders. Opening each one before training takes hours and
even listing them is slow on network storage, so a split folder is listed once and the listing is cached in
a JSON file keyed by the modification times of the folder and of every folder under it (a directory's mtime
changes whenever an entry is added to, removed from or renamed in it): a later load only ``stat``s those
folders. Files are opened when an item is read, and `FileDataset` then raises on, or skips, a bad one.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image
from torch.utils.data import Dataset

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}
"""What torchvision's ImageFolder accepts (its IMG_EXTENSIONS), compared case-insensitively, as it does."""
LISTING_VERSION = 2
"""2: files in torchvision ImageFolder order (a folder's own files before its sub-folders'), no .gif."""
RACY_NS = 2_000_000_000
"""A folder changed this recently may change again within the same mtime tick, unseen: its listing is not cached."""
WORDNET_ID = re.compile(r"n\d{8}")
ClassLookup = Callable[[str, str], int]
ClassGroups = tuple[tuple[int, ...], ...]
"""How a set is scored: per class of the set (its label), the model's classes whose largest logit is that class's
score. A set covering some of the model's classes has one singleton group per class (ImageNet-A/-R); ObjectNet's
113 classes each pool several ImageNet classes."""
BadFiles = Literal["error", "skip"]


class DatasetError(ValueError):
    """A bad dataset input; the message names the offending file or folder and what to do about it."""


# ------------------------------------------------------------------------------------------ lazy files


def _decode(path: Path, border: int = 0) -> Image.Image:
    """The file as an RGB image, ``border`` pixels cropped off every side (``data.border_crop``)."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except FileNotFoundError as err:
        raise DatasetError(
            f"image file {path} does not exist; restore it, fix its path, or set data.bad_files: skip"
        ) from err
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, struct.error, ...) for bad files
        raise DatasetError(
            f"image file {path} cannot be read as an image ({err}); replace or remove it, or set data.bad_files: skip"
        ) from err
    if not border:
        return rgb
    if min(rgb.size) <= 2 * border:
        raise DatasetError(
            f"image file {path} is {rgb.width}x{rgb.height}, too small to crop data.border_crop {border} pixels off "
            "every side; lower the crop or remove the image"
        )
    return rgb.crop((border, border, rgb.width - border, rgb.height - border))


class FileDataset(Dataset):
    """Image files decoded lazily: loading a bundle never opens an image, reading an item opens one.

    A missing or undecodable file raises a `DatasetError` naming it (``on_bad="error"``), or (``"skip"``) is
    warned about once, appended to ``bad_files`` and replaced by the next readable item (wrapping around), so
    a loop over the dataset never meets a hole. ``bad_files`` holds what this process read: DataLoader
    workers fill their own copies. ``border`` pixels are cropped off every side of each image as it is read
    (``data.border_crop``: ObjectNet's 2), so every consumer (decoded once, streamed, trained on) sees the same
    cropped image.
    """

    def __init__(
        self, paths: Sequence[Path], labels: Sequence[int], on_bad: BadFiles = "error", border: int = 0
    ) -> None:
        self.paths, self.labels, self.on_bad, self.border = list(paths), list(labels), on_bad, border
        self.bad_files: list[Path] = []
        self._bad_rows: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"item {i} of a dataset of {len(self)} images")
        for step in range(len(self)):
            row = (i + step) % len(self)
            if row in self._bad_rows:
                continue
            try:
                return _decode(self.paths[row], self.border), self.labels[row]
            except DatasetError as err:
                if self.on_bad == "error":
                    raise
                self._bad_rows.add(row)
                self.bad_files.append(self.paths[row])
                warnings.warn(f"skipping a bad image (data.bad_files: skip): {err}", stacklevel=2)
        raise DatasetError(f"none of the {len(self)} images from {self.paths[0].parent} can be read; check the files")

    def subset(self, rows: Sequence[int]) -> FileDataset:
        """The given rows, in order, with the same bad-file policy and border crop."""
        return FileDataset([self.paths[r] for r in rows], [self.labels[r] for r in rows], self.on_bad, self.border)

    def relabelled(self, labels: Sequence[int]) -> FileDataset:
        """The same files (bad-file policy, border crop) with other labels."""
        return FileDataset(self.paths, labels, self.on_bad, self.border)

    def cropped(self, border: int) -> FileDataset:
        """The same files and labels, ``border`` pixels cropped off every side of each image as it is read."""
        return FileDataset(self.paths, self.labels, self.on_bad, border)

    def fingerprint(self) -> str:
        """sha256 of every file's path, size and mtime, its label, the border crop and the bad-file policy: what
        its decoded copies are keyed by (`soups.decoded`); a file rewritten, added or removed changes it."""
        digest = hashlib.sha256(f"files {self.border} {self.on_bad}\n".encode())
        for path, label in zip(self.paths, self.labels, strict=True):
            try:
                stat = os.stat(path)
                digest.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\0{label}\n".encode())
            except OSError:
                digest.update(f"{os.path.abspath(path)}\0missing\0{label}\n".encode())
        return digest.hexdigest()


# ----------------------------------------------------------------------------------- cached listings


@dataclass(frozen=True)
class Listing:
    """One split folder: its class sub-folders, sorted, each with its image files in torchvision ImageFolder
    order (`_imagefolder_order`; files in nested folders included). Unlike ImageFolder, hidden entries (``.x``,
    macOS ``._x.jpg``) are left out and symlinked sub-folders of a class folder are not followed."""

    folder: Path
    classes: dict[str, list[Path]]


Names = dict[str, list[str]]
"""Class folder name -> its images' paths relative to it ('a.jpg', 'nested/b.jpg'): what the cache stores."""


def list_split(folder: Path, cache_dir: Path | None) -> Listing:
    """The folder's listing, from ``cache_dir`` when no folder under it changed since it was cached."""
    if cache_dir is None:
        return _to_listing(folder, _list(folder)[0])
    cache = cache_dir / f"{folder.name}-{hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]}.json"
    names = _read_cache(cache, folder)
    if names is None:
        started = time.time_ns()
        names, mtimes = _list(folder)
        if all(started - mtime > RACY_NS for mtime in mtimes.values()):
            _write_cache(cache, folder, names, mtimes)
    return _to_listing(folder, names)


def _to_listing(folder: Path, names: Names) -> Listing:
    bases = {name: folder / name for name in names}  # one join per file: 1.3M Path joins add up to seconds
    return Listing(folder, {name: [bases[name] / rel for rel in files] for name, files in names.items()})


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _imagefolder_order(relative: str) -> tuple[str, str]:
    """torchvision ImageFolder's order of a class folder's files, which official masks index (the paper's
    imagenet_98_idxs.npy): it walks ``sorted(os.walk(class folder))``, so folder by folder in sorted order of their
    paths (the class folder itself first), each folder's files sorted by name."""
    folder, _, name = relative.rpartition("/")
    return folder, name


def _list(folder: Path) -> tuple[Names, dict[str, int]]:
    """List the class folders and every image under them, with each folder's mtime taken *before* listing it
    (an entry added during the listing then makes the cache stale rather than silently incomplete)."""
    mtimes = {".": folder.stat().st_mtime_ns}
    names: Names = {}
    with os.scandir(folder) as scan:
        entries = sorted((e for e in scan if not e.name.startswith(".")), key=lambda e: e.name)
    for entry in entries:
        if entry.is_dir():
            files: list[str] = []
            _images_under(entry.path, entry.name, "", files, mtimes)
            names[entry.name] = sorted(files, key=_imagefolder_order)
        elif entry.is_file() and _is_image(entry.name):
            raise DatasetError(f"image {entry.path} sits directly in {folder}; move it into a class sub-folder")
    return names, mtimes


def _images_under(directory: str, relative: str, prefix: str, files: list[str], mtimes: dict[str, int]) -> None:
    """Append ``prefix`` + the name of every image under ``directory``; symlinked sub-folders are not followed
    (no loops), as rglob does. Strings, not Paths: building a Path per file is most of a listing's time."""
    mtimes[relative] = os.stat(directory).st_mtime_ns
    with os.scandir(directory) as scan:
        for entry in scan:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                _images_under(entry.path, f"{relative}/{entry.name}", f"{prefix}{entry.name}/", files, mtimes)
            elif entry.is_file() and _is_image(entry.name):
                files.append(prefix + entry.name)


def _read_cache(cache: Path, folder: Path) -> Names | None:
    """The cached names if they are for this folder and every folder they came from still has its mtime."""
    try:
        stored = json.loads(cache.read_text())
        if stored["version"] != LISTING_VERSION or stored["folder"] != str(folder.resolve()):
            return None
        if any(os.stat(folder / rel).st_mtime_ns != mtime for rel, mtime in stored["mtimes"].items()):
            return None
        return {str(name): [str(rel) for rel in files] for name, files in stored["classes"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # absent, unreadable or damaged: list again
        return None


def _write_cache(cache: Path, folder: Path, names: Names, mtimes: dict[str, int]) -> None:
    """Write atomically (parallel trials load the same folders); an unwritable cache only costs speed."""
    stored = {"version": LISTING_VERSION, "folder": str(folder.resolve()), "mtimes": mtimes, "classes": names}
    temporary = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=cache.parent, suffix=".tmp", delete=False) as handle:
            temporary = Path(handle.name)
            json.dump(stored, handle)
        os.replace(temporary, cache)
    except OSError as err:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        warnings.warn(
            f"cannot cache the listing of {folder} in {cache.parent} ({err}); every load lists it again: set "
            "data.cache_dir to a writable folder",
            stacklevel=3,
        )


# ----------------------------------------------------------------------------------- names of classes


def preview(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, … ({len(names)} in all)"


def read_mapping(path: Path, field: str) -> dict[str, str]:
    """``key<TAB>value`` or ``key,value`` lines; a tab wins, so values may contain commas ("tench, Tinca tinca")."""
    if not path.is_file():
        raise DatasetError(f"data.{field} file {path} does not exist; fix the path")
    mapping: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        key, found, value = line.partition("\t" if "\t" in line else ",")
        key, value = key.strip(), value.strip()
        if not (found and key and value):
            raise DatasetError(f"{path} line {number} is {line!r}; write 'folder<TAB>name' or 'folder,name'")
        if key in mapping:
            raise DatasetError(f"{path} line {number} names {key!r} a second time; keep one line per folder")
        mapping[key] = value
    return mapping


def resolve_classnames(choice: str | None, keys: list[str], where: str) -> list[str]:
    """The names the text tower reads, in class-index order; ``keys`` are the train folder names (csv labels)."""
    if choice is None:
        return list(keys)
    if choice == "imagenet":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        odd = [key for key in keys if not WORDNET_ID.fullmatch(key)]
        if len(keys) != len(IMAGENET_CLASSNAMES) or odd:
            raise DatasetError(
                f"data.classnames imagenet needs the 1000 ImageNet classes as WordNet-id folders (n01440764, …), "
                f"sorted in the conventional order; {where} has {len(keys)} classes"
                + (f", not named by WordNet id: {preview(odd, 3)}" if odd else "")
                + "; give a mapping file of folder<TAB>name lines instead"
            )
        return list(IMAGENET_CLASSNAMES)
    names = read_mapping(Path(choice), "classnames")
    missing = [key for key in keys if key not in names]
    if missing:
        raise DatasetError(
            f"data.classnames file {choice} has no name for the class folder(s) {preview(missing)} of {where}; "
            "add a 'folder<TAB>name' line for each"
        )
    return [names[key] for key in keys]


def resolve_templates(choice: str, default: list[str]) -> list[str]:
    """Prompt templates, each with one ``{}``; open_clip's are lambdas, so they are called with "{}" to get one."""
    if choice == "default":
        return list(default)
    if choice in ("openai_imagenet", "simple"):
        from open_clip import zero_shot_metadata as meta

        chosen = meta.OPENAI_IMAGENET_TEMPLATES if choice == "openai_imagenet" else meta.SIMPLE_IMAGENET_TEMPLATES
        return [template("{}") if callable(template) else template for template in chosen]
    path = Path(choice)
    if not path.is_file():
        raise DatasetError(f"data.templates {choice!r} is neither default, openai_imagenet, simple nor a file")
    templates = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if not templates:
        raise DatasetError(f"templates file {path} is empty; write one template per line, each with one {{}}")
    bad = [t for t in templates if t.count("{}") != 1 or t.count("{") != 1 or t.count("}") != 1]
    if bad:
        raise DatasetError(f"templates file {path}: {bad[0]!r} needs exactly one {{}} and no other braces; fix it")
    return templates


def is_pooled_map(label_map: str | None) -> bool:
    """Whether a ``data.label_maps`` entry is a many-to-one map (a JSON file), whose set has its own classes."""
    return label_map is not None and label_map.lower().endswith(".json")


def read_pooled_map(label_map: str, keys: Sequence[str], classnames: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """A many-to-one label map, in the official ``objectnet_to_imagenet_1k.json`` format: a JSON object from each
    of the set's class folders to train classes joined by ``"; "``, named by train folder (WordNet id) or by the
    class name the text tower reads (``data.classnames``; a name two classes share, as open_clip's 'missile' and
    'sunglasses', stands for both). Returns folder -> sorted train class indices, in sorted folder order (the
    set's labels are positions in it)."""
    path = Path(label_map)
    if not path.is_file():
        raise DatasetError(f"data.label_maps file {path} does not exist; fix the path")
    try:
        mapping = json.loads(path.read_text(encoding="utf-8-sig"))
    except ValueError as err:
        raise DatasetError(f"data.label_maps file {path} is not valid JSON ({err}); fix it") from err
    if not isinstance(mapping, dict) or not mapping or not all(isinstance(v, str) for v in mapping.values()):
        raise DatasetError(
            f'data.label_maps file {path} must be a JSON object of "set folder": "train class; train class" strings'
        )
    index: dict[str, set[int]] = {}
    for i, name in enumerate(classnames):
        index.setdefault(name, set()).add(i)
    index.update({key: {i} for i, key in enumerate(keys)})  # a train folder name wins over a class name
    groups: dict[str, tuple[int, ...]] = {}
    unknown: list[str] = []
    for folder in sorted(mapping):
        names = [name.strip() for name in mapping[folder].split(";")]
        unknown += [name for name in names if name not in index]
        groups[folder] = tuple(sorted(set().union(*(index[name] for name in names if name in index))))
    if unknown:
        raise DatasetError(
            f"data.label_maps file {path} names {preview(sorted(set(unknown)))}, which are neither train class "
            "folders nor class names (data.classnames); fix or remove them"
        )
    return groups


def class_lookup(keys: list[str], label_map: str | None, classnames: Sequence[str] = ()) -> ClassLookup:
    """How one set names its classes: like train's folders (default), by class index (``"index"``, as
    ImageNetV2), by the names in a mapping file from its folder names to train folder names, or (a JSON map,
    `read_pooled_map`) as classes of its own, each pooling some train classes (ObjectNet).

    The returned ``lookup(name, where)`` gives the class index (for a pooled map: the position of the folder
    among the map's sorted folders) or raises a `DatasetError` starting with ``where``.
    """
    index = {key: i for i, key in enumerate(keys)}
    if is_pooled_map(label_map):
        own = {folder: i for i, folder in enumerate(read_pooled_map(label_map, keys, classnames))}

        def by_pooled_map(name: str, where: str) -> int:
            if name not in own:
                raise DatasetError(
                    f'{where} has no entry in label map {label_map}; add "{name}": "train class; train class"'
                )
            return own[name]

        return by_pooled_map
    if label_map is None:

        def by_name(name: str, where: str) -> int:
            if name not in index:
                raise DatasetError(
                    f"{where} is not a class of the train split ({preview(keys)}); rename it, add the class to "
                    "train, or declare how this set names classes in data.label_maps"
                )
            return index[name]

        return by_name
    if label_map == "index":

        def by_index(name: str, where: str) -> int:
            if not (name.isascii() and name.isdecimal() and int(name) < len(keys)):
                raise DatasetError(
                    f"{where} is not a class index 0..{len(keys) - 1}, but data.label_maps names this set's classes "
                    "by index; rename the folder or drop the set from data.label_maps"
                )
            return int(name)

        return by_index
    mapping = read_mapping(Path(label_map), "label_maps")

    def by_file(name: str, where: str) -> int:
        if mapping.get(name) not in index:
            problem = "has no line" if name not in mapping else f"maps to {mapping[name]!r}, not a train class, in"
            raise DatasetError(f"{where} {problem} label map {label_map}; add or fix its 'name<TAB>train folder' line")
        return index[mapping[name]]

    return by_file


# ----------------------------------------------------------------------------------- sets of files


def read_manifest(manifest: Path) -> tuple[list[dict[str, str]], bool]:
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


def folder_set(listing: Listing, lookup: ClassLookup, on_bad: BadFiles, is_train: bool) -> tuple[FileDataset, set[int]]:
    """A split folder's images and labels, and the classes its class folders stand for (empty ones too)."""
    paths: list[Path] = []
    labels: list[int] = []
    classes: set[int] = set()
    for name, files in listing.classes.items():
        label = lookup(name, f"class folder {listing.folder / name}")
        if is_train and not files:
            raise DatasetError(f"class folder {listing.folder / name} has no images; add images or remove the folder")
        classes.add(label)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise DatasetError(f"split folder {listing.folder} contains no images in class sub-folders; add some")
    return FileDataset(paths, labels, on_bad), classes


def class_subsets(
    covered: dict[str, set[int]], keys: list[str], declared: dict[str, list[str]], where: str
) -> dict[str, list[int]]:
    """Sorted class indices of every set covering fewer classes than the model has: the classes it has (class
    folders, csv labels), or those declared in ``data.class_subsets``, which must include them."""
    unknown = sorted(set(declared) - set(covered))
    if unknown:
        raise DatasetError(
            f"data.class_subsets names {unknown}, which are not shift or ood_val sets among the {where} "
            f"({', '.join(covered) or 'none'}); fix the names"
        )
    index = {key: i for i, key in enumerate(keys)}
    subsets: dict[str, list[int]] = {}
    for name, present in covered.items():
        if name in declared:
            strangers = [key for key in declared[name] if key not in index]
            if strangers:
                raise DatasetError(
                    f"data.class_subsets[{name!r}] lists {preview(strangers)}, which are not train classes of "
                    f"{where}; use train folder names (csv: labels)"
                )
            chosen = {index[key] for key in declared[name]}
            left_out = [keys[i] for i in sorted(present - chosen)]
            if left_out:
                raise DatasetError(
                    f"set {name!r} has images of {preview(left_out)}, which data.class_subsets[{name!r}] leaves out; "
                    "add them"
                )
            present = chosen
        if len(present) < len(keys):
            subsets[name] = sorted(present)
    return subsets
