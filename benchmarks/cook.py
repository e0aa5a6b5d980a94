"""`soups cook uniform` measured three ways, in one run: against a bare read-and-add, against `mergekit-pytorch`,
and its start against a bare `import torch, safetensors.torch`.

1. In-process: times cover reading, checking and averaging (writing the soup is reported apart; the baseline
   writes nothing). Each measurement runs in a fresh subprocess, after the files have been read once so both
   sides see a warm page cache. Memory is the peak resident set above the level reached after the imports,
   sampled every millisecond. Targets: soup time <= 2x the bare baseline; peak growth from N=2 to N=8 <= one
   model size.
2. Whole commands, as a user runs them: `soups cook uniform FILES --out F` against `mergekit-pytorch` with
   the same mean (``linear``, every weight 1, normalised), each a fresh process, imports included; wall time
   and the process's peak RSS (``wait4``). Target: <= 0.4x mergekit's time and peak RSS.
3. `soups cook uniform` of two small files against `python -c "import torch, safetensors.torch"`: the
   file-only path loads nothing heavier. Target: its peak RSS at most 64 MiB above.

    bash benchmarks/mergekit_venv.sh && .venv/bin/python benchmarks/cook.py [--n 8] [--size-mb 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.mergekit_peer import mergekit_python, write_config  # noqa: E402

TENSORS_PER_MODEL = 16

CHILD = r"""
import json, os, sys, threading, time
from pathlib import Path
import torch
from safetensors import safe_open
from soups.checkpoint import Ingredient, save_state_dict
from soups.recipes import cook

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakSampler(threading.Thread):
    # Peak resident memory above the level after imports, sampled every millisecond.
    def __init__(self):
        super().__init__(daemon=True)
        self.base = self.peak = rss()
        self.running = True

    def run(self):
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.001)


mode, out, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
torch.set_num_threads(1)
sampler = PeakSampler()
sampler.start()
start = time.perf_counter()
if mode == "bare":
    acc = {}
    for path in paths:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if key in acc:
                    acc[key] += t
                else:
                    acc[key] = t.float()
else:
    (dish,) = cook("uniform", [Ingredient(Path(p)) for p in paths])
seconds = time.perf_counter() - start
if mode == "soup":
    save_state_dict(dish.state_dict, Path(out))
write_seconds = time.perf_counter() - start - seconds
sampler.running = False
sampler.join()
sampler.peak = max(sampler.peak, rss())
growth = (sampler.peak - sampler.base) / 2**20
print(json.dumps({"seconds": seconds, "write_seconds": write_seconds, "peak_rss_mb": growth}))
"""


def make_checkpoints(folder: Path, n: int, size_mb: int) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    numel = size_mb * 1024 * 1024 // 4 // TENSORS_PER_MODEL
    paths = []
    for index in range(n):
        g = torch.Generator().manual_seed(index)
        tensors = {f"block{k}.weight": torch.randn(numel // 256, 256, generator=g) for k in range(TENSORS_PER_MODEL)}
        path = folder / f"ingredient{index}.safetensors"
        save_file(tensors, str(path))
        paths.append(path)
    return paths


def measure(mode: str, paths: list[Path], out: Path, repeats: int) -> dict[str, float]:
    """Best of ``repeats`` fresh processes (the machine is shared; the minimum is the least disturbed)."""
    for path in paths:  # warm the page cache so neither side pays for the first read
        path.read_bytes()
    runs = []
    for _ in range(repeats):
        result = subprocess.run(
            [sys.executable, "-c", CHILD, mode, str(out), *map(str, paths)],
            capture_output=True,
            text=True,
            check=True,
        )
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    return min(runs, key=lambda run: run["seconds"])


LAUNCH = r"""
import json, os, sys, time
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"seconds": time.perf_counter() - started, "peak_rss_mb": usage.ru_maxrss / 1024,
                  "code": os.waitstatus_to_exitcode(status)}))
"""
"""Runs a command from a small interpreter without torch: a child's peak RSS counts the image it was forked
from, so forking it from this benchmark (torch loaded) would add ours to every figure."""


def run_command(argv: list[str], repeats: int) -> dict[str, float]:
    """Wall time and peak RSS (MiB) of a whole process, best of ``repeats`` by time."""
    runs = []
    for _ in range(repeats):
        done = subprocess.run([sys.executable, "-S", "-c", LAUNCH, *argv], capture_output=True, text=True)
        run = json.loads(done.stdout.strip().splitlines()[-1])
        if run.pop("code"):
            sys.exit(f"{' '.join(argv[:3])} failed: {done.stderr[-2000:]}")
        runs.append(run)
    return min(runs, key=lambda run: run["seconds"])


def compare_commands(folder: Path, paths: list[Path], repeats: int) -> list[str]:
    """`soups cook uniform` against `mergekit-pytorch` (whole processes), and the lean start of the first."""
    soups = [str(Path(sys.executable).parent / "soups"), "cook", "uniform"]
    ours = run_command([*soups, *map(str, paths), "--out", str(folder / "cooked.safetensors")], repeats)
    lines = [f"soups cook uniform, N={len(paths)}:  {ours['seconds']:.2f}s  peak RSS {ours['peak_rss_mb']:.0f} MB"]
    peer = mergekit_python()
    if peer is None:
        lines.append("mergekit venv missing (bash benchmarks/mergekit_venv.sh): no mergekit comparison")
    else:
        config = {"merge_method": "linear", "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in paths]}
        command = [str(peer.parent / "mergekit-pytorch"), str(write_config(config, folder / "uniform.yml"))]
        theirs = run_command([*command, str(folder / "mergekit-out")], repeats)
        imports = run_command([str(peer), "-c", "from mergekit.scripts.merge_raw_pytorch import main"], repeats)
        torch_only = run_command([sys.executable, "-c", "import torch, safetensors.torch"], repeats)
        time_ratio = ours["seconds"] / theirs["seconds"]
        rss_ratio = ours["peak_rss_mb"] / theirs["peak_rss_mb"]
        ours_above, theirs_above = (
            ours["peak_rss_mb"] - torch_only["peak_rss_mb"],
            theirs["peak_rss_mb"] - imports["peak_rss_mb"],
        )
        lines += [
            f"mergekit-pytorch linear, N={len(paths)}:  {theirs['seconds']:.2f}s  "
            f"peak RSS {theirs['peak_rss_mb']:.0f} MB",
            f"soups/mergekit: time {time_ratio:.2f}  peak RSS {rss_ratio:.2f}  (target <= 0.4 each)",
            f"peak RSS above the imports (torch + safetensors: {torch_only['peak_rss_mb']:.0f} MB; mergekit's: "
            f"{imports['peak_rss_mb']:.0f} MB): soups {ours_above:+.0f} MB, mergekit {theirs_above:+.0f} MB",
        ]
    import torch
    from safetensors.torch import save_file

    small = [folder / f"small{k}.safetensors" for k in range(2)]
    for k, path in enumerate(small):
        save_file({"w": torch.full((16,), float(k))}, str(path))
    bare = run_command([sys.executable, "-c", "import torch, safetensors.torch"], repeats)
    two = run_command([*soups, *map(str, small), "--out", str(folder / "small-soup.safetensors")], repeats)
    above = two["peak_rss_mb"] - bare["peak_rss_mb"]
    lines.append(
        f"soups cook uniform of 2 small files: peak RSS {two['peak_rss_mb']:.0f} MB, {above:+.0f} MB against "
        f"import torch, safetensors.torch ({bare['peak_rss_mb']:.0f} MB; target <= +64)"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8, help="number of ingredients (default 8)")
    parser.add_argument("--size-mb", type=int, default=64, help="size of one ingredient in MB (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="processes per measurement, best kept (default 3)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="soups-bench-") as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        paths = make_checkpoints(folder, args.n, args.size_mb)
        print(f"wrote {args.n} checkpoints of {args.size_mb} MB in {time.perf_counter() - started:.1f}s")
        out = folder / "soup.safetensors"
        bare = measure("bare", paths, out, args.repeats)
        soup = measure("soup", paths, out, args.repeats)
        soup_two = measure("soup", paths[:2], out, args.repeats)
        commands = compare_commands(folder, paths, args.repeats)
    growth = soup["peak_rss_mb"] - soup_two["peak_rss_mb"]
    print(f"bare read+add, N={args.n}:  {bare['seconds']:.2f}s  peak RSS +{bare['peak_rss_mb']:.0f} MB")
    print(
        f"uniform soup,  N={args.n}:  {soup['seconds']:.2f}s (+{soup['write_seconds']:.2f}s writing it)  "
        f"peak RSS +{soup['peak_rss_mb']:.0f} MB (incl. writing)"
    )
    print(f"uniform soup,  N=2:  {soup_two['seconds']:.2f}s  peak RSS +{soup_two['peak_rss_mb']:.0f} MB")
    print(f"time ratio soup/bare: {soup['seconds'] / bare['seconds']:.2f}  (target <= 2)")
    print(f"peak RSS growth N=2 -> N={args.n}: {growth:.0f} MB = {growth / args.size_mb:.2f} model sizes (target <= 1)")
    print("\n".join(commands))


if __name__ == "__main__":
    main()
