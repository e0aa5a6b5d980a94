"""Fine-tuning and evaluation throughput, and what decoding a split once saves, measured in one run.

1. Fine-tuning: `soups.train.finetune` from random init (model.pretrained null, so no pretraining), default
   FinetuneConfig otherwise. Reports finetune()'s own ``train_images_per_second`` (training loop plus the
   per-epoch held-out evaluation) and images/s over the wall time of the whole call (copying the shared
   start, zero-shot evaluation, saving; `prepare_finetune` decoded the splits once before). Best of
   ``--repeats`` runs.
2. Evaluation on the held-out split from the decoded uint8 tensors (`prepare_finetune`, then `evaluate`).
3. The same split streamed by ``--workers`` DataLoader processes (what the kitchen does beyond
   ``eval.cache_bytes``), persistent workers, so repeated passes do not restart them.
4. The same evaluation as a naive loop would do it: read every PIL image of the dataset, apply the model's
   eval transform (`Preprocess.decode_transform()` + normalise), batch, forward; accuracy must match (2).
   The speed-up of (2) over (4) is printed per evaluation and for ``--candidates`` models, where the cached
   path pays one decode of the split up front.

``--gpu-compare`` (CUDA only; on CPU it says so and exits 0) runs finetune() with ``TrainConfig.bf16`` off
and on and compares its training images/s (best of ``--repeats``). ``--deterministic-compare`` does the same
with ``TrainConfig.deterministic`` (what it costs on this device) and says whether each side's reruns left
byte-identical weights (what it buys).

    .venv/bin/python benchmarks/train.py [--model soups-vit-tiny] [--device auto] [--repeats 3]
        [--gpu-compare | --deterministic-compare]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from soups.checkpoint import file_sha256
from soups.config import DataConfig, FinetuneConfig, ModelConfig, TrainConfig
from soups.data import load_dataset
from soups.evaluate import evaluate
from soups.images import Preprocess, StreamedImages, decode
from soups.runtime import resolve_device, use_cores, use_determinism
from soups.train import FinetuneInputs, finetune, prepare_finetune


def best_of(repeats: int, run) -> float:
    """Fewest seconds of ``repeats`` calls (the machine is shared; the minimum is the least disturbed)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


@torch.inference_mode()
def naive_evaluate(model, dataset, preprocess: Preprocess, batch_size: int, device: torch.device) -> float:
    """Decode-per-evaluation baseline: PIL image -> eval transform -> normalise -> batch -> fp32 forward."""
    transform = preprocess.decode_transform()
    model.eval()
    correct = 0
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        images = torch.stack([transform(image.convert("RGB")) for image, _ in items])
        labels = torch.tensor([int(label) for _, label in items], device=device)
        logits = model(preprocess.normalize(images.to(device)))  # fp32, as `evaluate` by default (eval.precision)
        correct += int((logits.argmax(dim=-1) == labels).sum())
    return correct / len(dataset)


def compare_setting(config: FinetuneConfig, inputs: FinetuneInputs, setting: str, repeats: int) -> dict[bool, float]:
    """finetune() itself with one boolean TrainConfig ``setting`` off and on (the only difference between runs):
    best training images/s of each; says whether the runs of each side left byte-identical files."""
    speeds = {}
    with tempfile.TemporaryDirectory(prefix="soups-bench-") as tmp:
        for value in (False, True):
            variant = config.model_copy(update={"train": config.train.model_copy(update={setting: value})})
            runs = [finetune(variant, inputs, Path(tmp) / f"{value}-{i}.safetensors") for i in range(repeats)]
            speeds[value] = max(run.metrics["train_images_per_second"] for run in runs)
            same = len({file_sha256(run.checkpoint) for run in runs}) == 1
            print(f"  {setting} {value}: {repeats} runs, weights {'byte-identical' if same else 'differ'}")
    use_determinism(False)
    return speeds


def gpu_compare(config: FinetuneConfig, inputs: FinetuneInputs, device: torch.device, repeats: int) -> None:
    """bf16 autocast on and off (TrainConfig.bf16), CUDA only."""
    if device.type != "cuda":
        print("--gpu-compare needs CUDA (bf16 autocast is only used there); nothing to compare on CPU")
        return
    print(f"GPU: {torch.cuda.get_device_name(device)}; TF32 matmul allowed: {torch.backends.cuda.matmul.allow_tf32}")
    speeds = compare_setting(config, inputs, "bf16", repeats)
    print(f"fine-tuning, fp32:             {speeds[False]:9.1f} images/s")
    print(f"fine-tuning, bf16 autocast:    {speeds[True]:9.1f} images/s  ({speeds[True] / speeds[False]:.2f}x)")


def deterministic_compare(config: FinetuneConfig, inputs: FinetuneInputs, repeats: int) -> None:
    """What train.deterministic costs and buys on this device: speed off vs on, and whether reruns match."""
    speeds = compare_setting(config, inputs, "deterministic", repeats)
    print(f"fine-tuning, deterministic off: {speeds[False]:9.1f} images/s")
    print(f"fine-tuning, deterministic on:  {speeds[True]:9.1f} images/s  ({speeds[True] / speeds[False]:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="soups-vit-tiny", help="open_clip architecture (random init)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement, best kept (default 3)")
    parser.add_argument("--candidates", type=int, default=5, help="models evaluated on one split (default 5)")
    parser.add_argument("--gpu-compare", action="store_true", help="CUDA only: fine-tuning with vs without bf16")
    parser.add_argument(
        "--deterministic-compare", action="store_true", help="fine-tuning with train.deterministic off vs on"
    )
    parser.add_argument("--image-folder", type=Path, help="use an imagefolder dataset (root with train/ val/ test/)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the streamed evaluation")
    args = parser.parse_args()

    device = resolve_device(args.device)
    data = DataConfig(name="imagefolder", root=args.image_folder) if args.image_folder else DataConfig()
    config = FinetuneConfig(
        model=ModelConfig(name=args.model, pretrained=None),
        data=data,
        train=TrainConfig(epochs=args.epochs, device=str(device)),
    )
    threads = use_cores(config.train.threads)
    autocast = "on (bf16, CUDA)" if device.type == "cuda" else "off (train.py autocasts on CUDA only)"
    print(f"model {args.model} (random init), {data.name}, device {device}, {threads} CPU threads, autocast {autocast}")
    inputs = prepare_finetune(config, device)  # shared by every run, as in a sweep
    if args.gpu_compare:
        gpu_compare(config, inputs, device, args.repeats)
        return
    if args.deterministic_compare:
        deterministic_compare(config, inputs, args.repeats)
        return

    runs = []
    with tempfile.TemporaryDirectory(prefix="soups-bench-") as tmp:
        for _ in range(args.repeats):
            started = time.perf_counter()
            result = finetune(config, inputs, Path(tmp) / "ingredient.safetensors")
            runs.append((time.perf_counter() - started, result.metrics))
    seen = round(runs[0][1]["train_images_per_second"] * runs[0][1]["train_seconds"])  # train images x epochs
    wall = min(seconds for seconds, _ in runs)
    loop = max(metrics["train_images_per_second"] for _, metrics in runs)
    print(f"fine-tuning, {args.epochs} epochs of {seen // args.epochs} images (best of {args.repeats}):")
    print(f"  train_images_per_second (loop + per-epoch eval): {loop:9.1f} images/s")
    print(f"  whole finetune() call ({wall:.2f}s):               {seen / wall:9.1f} images/s")

    classifier, preprocess, heldout = inputs.start, inputs.preprocess, inputs.heldout
    dataset = load_dataset(config.data).heldout
    batch = config.train.eval_batch_size
    cached_acc = evaluate(classifier, heldout, preprocess, batch_size=batch, device=device).accuracy
    naive_acc = naive_evaluate(classifier, dataset, preprocess, batch, device)
    if abs(cached_acc - naive_acc) > 1 / len(heldout):
        raise SystemExit(f"accuracy differs: cached {cached_acc:.4f} vs decode-per-evaluation {naive_acc:.4f}")
    cached = best_of(args.repeats, lambda: evaluate(classifier, heldout, preprocess, batch_size=batch, device=device))
    naive = best_of(args.repeats, lambda: naive_evaluate(classifier, dataset, preprocess, batch, device))
    streamed_split = StreamedImages(dataset, preprocess, workers=args.workers)
    streamed_acc = evaluate(classifier, streamed_split, preprocess, batch_size=batch, device=device).accuracy
    if streamed_acc != cached_acc:
        raise SystemExit(f"accuracy differs: cached {cached_acc:.4f} vs streamed {streamed_acc:.4f}")
    streamed = best_of(
        args.repeats, lambda: evaluate(classifier, streamed_split, preprocess, batch_size=batch, device=device)
    )
    decode_once = best_of(args.repeats, lambda: decode(dataset, preprocess))
    n, k = len(heldout), args.candidates
    print(f"evaluation on held-out ({n} images, batch {batch}, best of {args.repeats}; accuracy {cached_acc:.3f}):")
    print(f"  cached decoded tensors:  {n / cached:9.1f} images/s  ({cached * 1e3:.1f} ms)")
    print(f"  decode per evaluation:   {n / naive:9.1f} images/s  ({naive * 1e3:.1f} ms)")
    print(f"  streamed, {args.workers} workers:     {n / streamed:9.1f} images/s  ({streamed * 1e3:.1f} ms)")
    print(f"  decoding the split once: {decode_once * 1e3:.1f} ms")
    print(f"  speed-up per evaluation: {naive / cached:.2f}x")
    print(
        f"  speed-up for {k} candidates (cached pays one decode): "
        f"{k * naive / (decode_once + k * cached):.2f}x  ({k * naive:.3f}s vs {decode_once + k * cached:.3f}s)"
    )


if __name__ == "__main__":
    main()
