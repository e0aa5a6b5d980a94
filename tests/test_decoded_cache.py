"""The machine's decoded-data cache (soups/decoded.py): a hit is the fresh decode, a changed dataset misses, a
damaged file is rebuilt, concurrent writers leave one valid file."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from soups.data import ArrayDataset
from soups.decoded import DecodedCacheError, cache_key, cached_decode, dataset_fingerprint, read_decoded
from soups.imagefiles import FileDataset
from soups.images import Preprocess, decode

PREPROCESS = Preprocess(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _arrays(seed: int = 0, count: int = 12) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, 20, 20), dtype=np.uint8)
    labels = rng.integers(0, 3, count)
    return ArrayDataset(images, labels, np.arange(count))


def _only_file(folder: Path) -> Path:
    (path,) = folder.iterdir()
    return path


def _assert_same(got, want) -> None:
    assert got.images.dtype == torch.uint8 and got.labels.dtype == torch.int64
    assert torch.equal(got.images, want.images)
    assert torch.equal(got.labels, want.labels)


def test_a_hit_gives_the_arrays_of_a_fresh_decode(tmp_path: Path) -> None:
    dataset = _arrays()
    first = cached_decode(dataset, PREPROCESS, tmp_path)
    path = _only_file(tmp_path)
    hit = cached_decode(dataset, PREPROCESS, tmp_path)
    _assert_same(hit, decode(dataset, PREPROCESS))
    _assert_same(first, hit)
    assert isinstance(read_decoded(path, path.stem).images, torch.Tensor)
    assert _only_file(tmp_path) == path  # read, not written again


def test_a_hit_on_image_files_matches_a_fresh_decode(tmp_path: Path) -> None:
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((24, 30, 3), 40 * i, dtype=np.uint8)).save(paths[-1])
    dataset = FileDataset(paths, [0, 1, 0, 1])
    cache = tmp_path / "cache"
    cached_decode(dataset, PREPROCESS, cache)
    _assert_same(cached_decode(dataset, PREPROCESS, cache), decode(dataset, PREPROCESS))


def test_a_changed_fingerprint_misses(tmp_path: Path) -> None:
    cached_decode(_arrays(seed=0), PREPROCESS, tmp_path)
    other = _arrays(seed=1)
    assert dataset_fingerprint(other) != dataset_fingerprint(_arrays(seed=0))
    _assert_same(cached_decode(other, PREPROCESS, tmp_path), decode(other, PREPROCESS))
    assert len(list(tmp_path.iterdir())) == 2
    bigger = Preprocess(20, PREPROCESS.mean, PREPROCESS.std)  # the same images decoded at another size miss too
    assert cached_decode(other, bigger, tmp_path).images.shape[-1] == 20
    assert len(list(tmp_path.iterdir())) == 3


def test_a_rewritten_image_file_changes_the_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(path)
    before = FileDataset([path], [0]).fingerprint()
    Image.fromarray(np.full((9, 8, 3), 255, dtype=np.uint8)).save(path)
    assert FileDataset([path], [0]).fingerprint() != before
    assert FileDataset([path], [1]).fingerprint() != FileDataset([path], [0]).fingerprint()


@pytest.mark.parametrize("damage", ["truncate", "flip_pixel", "flip_label", "garbage", "empty"])
def test_a_damaged_cache_file_is_detected_and_rebuilt(tmp_path: Path, damage: str) -> None:
    dataset = _arrays()
    cached_decode(dataset, PREPROCESS, tmp_path)
    path = _only_file(tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 100]
    elif damage == "flip_pixel":
        data[-1] ^= 0xFF
    elif damage == "flip_label":
        labels_at = len(data) - len(dataset) * 3 * 16 * 16 - 8
        data[labels_at] ^= 0x01
    elif damage == "garbage":
        data = bytearray(b"not a cache file at all" * 10)
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(DecodedCacheError):
        read_decoded(path, path.stem)
    rebuilt = cached_decode(dataset, PREPROCESS, tmp_path)
    _assert_same(rebuilt, decode(dataset, PREPROCESS))
    _assert_same(read_decoded(path, path.stem), rebuilt)  # the file was replaced by a valid one


def test_a_file_under_another_key_is_refused(tmp_path: Path) -> None:
    dataset = _arrays()
    cached_decode(dataset, PREPROCESS, tmp_path)
    path = _only_file(tmp_path)
    with pytest.raises(DecodedCacheError, match="header"):
        read_decoded(path, cache_key("another dataset", PREPROCESS))


def test_concurrent_writers_end_with_one_valid_file(tmp_path: Path) -> None:
    dataset = _arrays(count=40)
    results, errors = [], []
    barrier = threading.Barrier(6)

    def decode_at_once() -> None:
        try:
            barrier.wait()
            results.append(cached_decode(dataset, PREPROCESS, tmp_path))
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=decode_at_once) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    path = _only_file(tmp_path)  # no temporary files left behind
    fresh = decode(dataset, PREPROCESS)
    _assert_same(read_decoded(path, path.stem), fresh)
    for result in results:
        _assert_same(result, fresh)


def test_without_a_fingerprint_nothing_is_cached(tmp_path: Path) -> None:
    class Plain(torch.utils.data.Dataset):
        labels = [0, 1]

        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int):
            return Image.fromarray(np.full((10, 10, 3), i * 100, dtype=np.uint8)), i

    assert dataset_fingerprint(Plain()) is None
    _assert_same(cached_decode(Plain(), PREPROCESS, tmp_path), decode(Plain(), PREPROCESS))
    assert not list(tmp_path.iterdir())


def test_subsets_are_keyed_by_their_rows(tmp_path: Path) -> None:
    dataset = _arrays()
    first, second = torch.utils.data.Subset(dataset, [0, 2, 4]), torch.utils.data.Subset(dataset, [1, 3, 5])
    assert dataset_fingerprint(first) != dataset_fingerprint(second)
    cached_decode(first, PREPROCESS, tmp_path)
    _assert_same(cached_decode(second, PREPROCESS, tmp_path), decode(second, PREPROCESS))
