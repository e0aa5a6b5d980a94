"""Evaluation in fp32 (`eval.precision: fp32`, the official protocol) against bf16 autocast, in one run: images/s
of each, the time ratio, the largest logit difference and how many top-1 predictions change.

A random-init model of the chosen architecture scores random uint8 images at its resolution, so no weights are
needed; on CUDA the ratio is what bf16 saves, on a CPU bf16 autocast is usually slower. Each time is the best of
``--repeats`` passes (a shared machine disturbs single ones); the top-1 changes are what accuracy can move by.

    .venv/bin/python benchmarks/eval_precision.py [--model soups-vit-tiny] [--images 2048] [--device auto]
        [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from soups.evaluate import logits_of  # noqa: E402
from soups.images import ImageTensors, Preprocess  # noqa: E402
from soups.models import empty_classifier  # noqa: E402
from soups.runtime import resolve_device  # noqa: E402


def timed(model, data, preprocess, device, precision: str, batch: int, repeats: int) -> tuple[torch.Tensor, float]:
    """The logits and the fewest seconds of ``repeats`` passes, after one warm-up batch."""
    logits_of(model, data.subset(torch.arange(min(len(data), batch))), preprocess, device=device, precision=precision)
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        logits = logits_of(model, data, preprocess, batch_size=batch, device=device, precision=precision)
        seconds.append(time.perf_counter() - start)  # logits_of returns CPU tensors: the device is done
    return logits, min(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="soups-vit-tiny")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = empty_classifier(args.model, 1000, device).eval()
    preprocess = Preprocess.of(model)
    images = torch.randint(0, 256, (args.images, 3, preprocess.size, preprocess.size), dtype=torch.uint8)
    data = ImageTensors(images, torch.zeros(args.images, dtype=torch.long))
    fp32, fp32_s = timed(model, data, preprocess, device, "fp32", args.batch, args.repeats)
    bf16, bf16_s = timed(model, data, preprocess, device, "bf16", args.batch, args.repeats)
    changed = int((fp32.argmax(-1) != bf16.argmax(-1)).sum())
    print(f"{args.model} on {device}, {args.images} images, best of {args.repeats}")
    print(f"fp32: {args.images / fp32_s:,.0f} images/s; bf16: {args.images / bf16_s:,.0f} images/s")
    print(
        f"time_ratio_bf16_over_fp32={bf16_s / fp32_s:.3f} max_logit_difference={float((fp32 - bf16).abs().max()):.4g} "
        f"top1_changed={changed}/{args.images}"
    )


if __name__ == "__main__":
    main()
