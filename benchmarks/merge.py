"""Merge recipes vs mergekit on the same files: max abs difference, wall time and peak RSS, in one run.

N random fine-tunes of a random base (correlated task vectors, 16 tensors each) are written once. Each recipe
runs in a fresh process of the project's venv, its mergekit equivalent (benchmarks/mergekit_peer.py) in a fresh
process of the mergekit venv; both are timed after their imports, both write their result (mergekit cannot
skip it), both on one torch thread. Memory is sampled every millisecond as in benchmarks/cook.py: the peak
resident set above the level after imports, and the same without file-backed pages (safetensors memory-maps its
inputs; those pages are counted in RSS but are the page cache's, dropped under pressure; this platform reads
with positioned reads instead). DARE draws different masks from mergekit's (and rescales differently), so it
is timed, not compared. The last line is the worst ratio ours/mergekit over task arithmetic, TIES, Model Stock
and SLERP: ``worst_time_ratio=<f> worst_rss_ratio=<f>`` (goal: time <= 0.6, RSS <= 1).

    bash benchmarks/mergekit_venv.sh && .venv/bin/python benchmarks/merge.py [--n 8] [--size-mb 64] [--small]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.mergekit_peer import PEER_METHODS, mergekit_config, mergekit_python, write_config  # noqa: E402

TENSORS_PER_MODEL = 16
CASES = [
    ("task_arithmetic", {"lambda": 0.3}),
    ("ties", {"density": 0.2, "lambda": 1.0}),
    ("dare", {"p": 0.5, "combine": "linear", "lambda": 0.3}),
    ("model_stock", {}),
    ("slerp", {"t": 0.5}),
]

CHILD = r"""
import json, os, sys, threading, time
from pathlib import Path
import torch

job = json.loads(sys.argv[1])
if job["side"] == "ours":
    from soups.checkpoint import Ingredient, save_state_dict
    from soups.recipes import RecipeInputs, cook
else:
    from mergekit.scripts.merge_raw_pytorch import main
PAGE = os.sysconf("SC_PAGE_SIZE")


def memory():
    with open("/proc/self/statm") as f:
        _, resident, shared = (int(v) * PAGE for v in f.read().split()[:3])
    return resident, resident - shared


class PeakSampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.base = memory()
        self.peak = list(self.base)
        self.running = True

    def sample(self):
        self.peak = [max(p, m) for p, m in zip(self.peak, memory())]

    def run(self):
        while self.running:
            self.sample()
            time.sleep(0.001)


torch.set_num_threads(1)
sampler = PeakSampler()
sampler.start()
start = time.perf_counter()
if job["side"] == "ours":
    ingredients = [Ingredient(Path(p)) for p in job["paths"]]
    (dish,) = cook(job["recipe"], ingredients, RecipeInputs(base=Path(job["base"])), **job["options"])
    save_state_dict(dish.state_dict, Path(job["out"]))
else:
    main.main([job["config"], job["out"], "--num-threads", "1", "--quiet"], standalone_mode=False)
seconds = time.perf_counter() - start
sampler.running = False
sampler.join()
sampler.sample()
rss, anon = ((p - b) / 2**20 for p, b in zip(sampler.peak, sampler.base))
print(json.dumps({"seconds": seconds, "rss_mb": rss, "anon_mb": anon}))
"""


def make_checkpoints(folder: Path, n: int, size_mb: int) -> tuple[Path, list[Path]]:
    """A random base and n fine-tunes of it whose task vectors share a direction (cosine about 0.5)."""
    numel = size_mb * 2**20 // 4 // TENSORS_PER_MODEL
    g = torch.Generator().manual_seed(0)
    base = {f"block{k}.weight": torch.randn(numel // 256, 256, generator=g) for k in range(TENSORS_PER_MODEL)}
    shared = {key: torch.randn(value.shape, generator=g) for key, value in base.items()}
    save_file(base, str(folder / "base.safetensors"))
    paths = []
    for index in range(n):
        tuned = {
            key: value + 0.01 * (shared[key] + torch.randn(value.shape, generator=g)) for key, value in base.items()
        }
        paths.append(folder / f"finetune{index}.safetensors")
        save_file(tuned, str(paths[-1]))
    return folder / "base.safetensors", paths


def measure(python: Path, job: dict, repeats: int) -> dict[str, float]:
    """Best of ``repeats`` fresh processes (the machine is shared; the minimum is the least disturbed)."""
    runs = []
    for _ in range(repeats):
        done = subprocess.run(
            [str(python), "-c", CHILD, json.dumps(job)], capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1"}
        )
        if done.returncode:
            raise RuntimeError(f"{job['side']} {job.get('recipe', '')} failed:\n{done.stderr[-3000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return min(runs, key=lambda run: run["seconds"])


def max_abs_difference(a: Path, b: Path) -> float:
    """Key by key, so comparing two big files holds one tensor of each."""
    worst = 0.0
    with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
        for key in sorted(fa.keys()):
            worst = max(worst, float((fa.get_tensor(key).float() - fb.get_tensor(key).float()).abs().max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8, help="number of fine-tuned ingredients (default 8)")
    parser.add_argument("--size-mb", type=int, default=64, help="size of one checkpoint in MB (default 64)")
    parser.add_argument("--small", action="store_true", help="4 MB checkpoints: a quick check")
    parser.add_argument("--repeats", type=int, default=1, help="processes per measurement, best kept (default 1)")
    args = parser.parse_args()
    size_mb = 4 if args.small else args.size_mb
    peer = mergekit_python()
    if peer is None:
        sys.exit("mergekit venv missing: bash benchmarks/mergekit_venv.sh")
    ours_python = Path(sys.executable)
    rows = []
    with tempfile.TemporaryDirectory(prefix="soups-merge-bench-") as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        base, paths = make_checkpoints(folder, args.n, size_mb)
        print(f"wrote base + {args.n} checkpoints of {size_mb} MB in {time.perf_counter() - started:.1f}s")
        for recipe, options in CASES:
            inputs = paths[:2] if recipe == "slerp" else paths
            common = {"recipe": recipe, "options": options, "paths": [str(p) for p in inputs], "base": str(base)}
            ours_out, theirs_out = folder / f"{recipe}.safetensors", folder / f"{recipe}-mergekit"
            config = write_config(mergekit_config(recipe, inputs, base, options), folder / f"{recipe}.yml")
            ours = measure(ours_python, {**common, "side": "ours", "out": str(ours_out)}, args.repeats)
            theirs = measure(peer, {"side": "mergekit", "config": str(config), "out": str(theirs_out)}, args.repeats)
            diff = max_abs_difference(ours_out, theirs_out / "model.safetensors") if recipe in PEER_METHODS else None
            rows.append((recipe, len(inputs), ours, theirs, diff))
            shown = "n/a (random masks)" if diff is None else f"{diff:.2e}"
            print(
                f"{recipe:16s} N={len(inputs)}  ours {ours['seconds']:6.2f}s  RSS +{ours['rss_mb']:5.0f} MB "
                f"(anon +{ours['anon_mb']:5.0f})  |  mergekit {theirs['seconds']:6.2f}s  RSS +{theirs['rss_mb']:5.0f} "
                f"MB (anon +{theirs['anon_mb']:5.0f})  |  max |diff| {shown}"
            )
    compared = [r for r in rows if r[4] is not None]
    time_ratios = [r[2]["seconds"] / r[3]["seconds"] for r in rows]
    memory_ratios = [r[2]["rss_mb"] / max(r[3]["rss_mb"], 1.0) for r in rows]
    print(
        f"summary: {args.n} x {size_mb} MB; max |ours - mergekit| "
        + ", ".join(f"{r[0]} {r[4]:.1e}" for r in compared)
        + f"; time ours/mergekit {min(time_ratios):.2f}-{max(time_ratios):.2f}; "
        f"peak RSS ours/mergekit {min(memory_ratios):.2f}-{max(memory_ratios):.2f}"
    )
    peers = [r for r in rows if r[0] in PEER_METHODS]
    worst_time = max(r[2]["seconds"] / r[3]["seconds"] for r in peers)
    worst_rss = max(r[2]["rss_mb"] / max(r[3]["rss_mb"], 1.0) for r in peers)
    print(f"worst_time_ratio={worst_time:.2f} worst_rss_ratio={worst_rss:.2f}")


if __name__ == "__main__":
    main()
