"""Streaming the train split: images/s and peak memory for 5k vs 20k images, and 0 vs 2 workers, in one run.

Generates (once, reused) an image folder of ``--images`` 256 px JPEGs in 10 classes, then, each in a fresh
process, reads one epoch through `soups.train_input.epoch_batches` exactly as fine-tuning streams it (the
paper's train transform at 224 px: random resized crop 0.08..1, flip, timm ``rand-m9-n2``; batch 256, the
train split over `train.cache_bytes` so it streams). Peak RSS is sampled over the whole process tree (the
trainer and its workers) every 20 ms, above the level right after imports. Memory must not grow with the
dataset (20k vs 5k images: growth <= 10 %), only with workers x prefetch x batch.

Last line: ``rss_growth=<fraction> images_per_second=<n>`` (2 workers, 20k images).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CLASSES = 10
SIZE = 256


def make_folder(root: Path, images: int) -> None:
    """train/<class>/<i>.jpg (smooth gradients plus a shape, about 8 KB each), and tiny val/ and test/."""
    import numpy as np
    from PIL import Image, ImageDraw

    marker = root / f".complete-{images}"
    if marker.exists():
        return
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, SIZE)
    for split, count in (("train", images), ("val", CLASSES), ("test", CLASSES)):
        for index in range(count):
            label = index % CLASSES
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            colour = rng.integers(0, 255, 3)
            pixels = (ramp[None, :, None] * colour[None, None, :] + ramp[:, None, None] * (255 - colour)) / 2
            image = Image.fromarray(pixels.astype(np.uint8))
            x, y = rng.integers(0, SIZE - 64, 2)
            box = (int(x), int(y), int(x) + 64, int(y) + 48)
            ImageDraw.Draw(image).ellipse(box, fill=tuple(int(c) for c in colour))
            image.save(folder / f"{index}.jpg", quality=85)
    marker.touch()


MEASURE = r"""
import json, os, sys, threading, time
import torch
from torch.utils.data import Subset
from soups.config import DataConfig, TrainConfig
from soups.data import load_dataset
from soups.images import Preprocess
from soups.train_input import TrainImages, epoch_batches

root, count, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def tree_rss():
    pids, total = [os.getpid()], 0
    try:
        with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
            pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
    return total

bundle = load_dataset(DataConfig(name="imagefolder", root=root))
train_split = Subset(bundle.train, list(range(count)))
preprocess = Preprocess(224, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
settings = TrainConfig(batch_size=256, workers=workers, cache_bytes=0, crop_scale=(0.08, 1.0), hflip=True,
                       randaugment_m=9, randaugment_n=2)
base = peak = tree_rss()
done = False
def sample():
    global peak
    while not done:
        peak = max(peak, tree_rss())
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
epoch = epoch_batches(TrainImages(train_split, None), preprocess, settings)
started = time.perf_counter()
seen = 0
for images, labels in epoch(1):
    seen += len(labels)
seconds = time.perf_counter() - started
done = True
print(json.dumps({"images_per_second": seen / seconds, "peak_mb": (peak - base) / 2**20, "images": seen}))
"""


def measure(root: Path, count: int, workers: int) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(root), str(count), str(workers)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/tmp/soups-input-bench"), help="image folder (made once)")
    parser.add_argument("--images", type=int, default=20_000, help="train images generated (default 20000)")
    parser.add_argument("--small", type=int, default=5_000, help="the smaller epoch (default 5000)")
    args = parser.parse_args()
    started = time.perf_counter()
    make_folder(args.root, args.images)
    print(f"image folder {args.root}: {args.images} train JPEGs at {SIZE} px ({time.perf_counter() - started:.0f}s)")
    small = measure(args.root, args.small, 2)
    large = measure(args.root, args.images, 2)
    serial = measure(args.root, args.small, 0)
    for name, row in (("2 workers, small", small), ("2 workers, large", large), ("0 workers, small", serial)):
        print(f"{name:17} {row['images']:6d} images: {row['images_per_second']:7.1f} images/s, "
              f"peak RSS +{row['peak_mb']:.0f} MB over the post-import level")
    growth = (large["peak_mb"] - small["peak_mb"]) / small["peak_mb"]
    print(f"speed-up from 0 to 2 workers: {small['images_per_second'] / serial['images_per_second']:.2f}x "
          f"({os.cpu_count()} cores)")
    print(f"rss_growth={growth:.3f} images_per_second={large['images_per_second']:.1f}")


if __name__ == "__main__":
    main()
