"""Small checkpoint factories and a two-worker stack, shared by the tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from soups.checkpoint import Ingredient, save_state_dict


def random_state_dict(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(6, 5, generator=g).to(dtype),
        "layer.bias": torch.randn(6, generator=g).to(dtype),
        "norm.scale": (torch.rand(3, 2, 2, generator=g) * 4).to(dtype),
        "counter": torch.tensor([seed], dtype=torch.int64),
    }


def write_ingredients(folder: Path, seeds: list[int], dtype: torch.dtype = torch.float32) -> list[Ingredient]:
    return [
        Ingredient(save_state_dict(random_state_dict(s, dtype), folder / f"ingredient-{s}.safetensors")) for s in seeds
    ]


def perturbed_pool(base: Path, folder: Path, count: int = 3, seed: int = 0) -> list[Ingredient]:
    """``count`` ingredients: the start at ``base`` with small seeded noise on every floating tensor, scored
    0.5, 0.6, ... so the last is the best."""
    from soups.checkpoint import load_state_dict

    start = load_state_dict(base)
    noise = torch.Generator().manual_seed(seed)
    pool = []
    for k in range(count):
        weights = {
            key: value + 0.05 * torch.randn(value.shape, generator=noise) if value.is_floating_point() else value
            for key, value in start.items()
        }
        pool.append(Ingredient(save_state_dict(weights, folder / f"i{k}.safetensors"), 0.5 + k / 10, f"i{k}"))
    return pool


def stack_folder() -> Path:
    """A folder PostgreSQL can reach for `soups stack up --root`: run as root, it runs as the `postgres` user,
    and pytest's own temporary folders are private to root."""
    root = Path(tempfile.mkdtemp(prefix="soups-stack-"))
    root.chmod(0o755)
    return root


def cli_environment(home: Path | None = None) -> dict[str, str]:
    """The environment a `soups` process gets in the fault tests: the CLI's own defaults (Prefect's home under
    tracking.root and its temporary server), one-line errors; ``home`` as HOME when given."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "PREFECT_API_URL", "SOUPS_DEBUG")}
    return {**env, "HOME": str(home)} if home else env


CLIENT_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING")
"""What a client of an authenticated stack reads (MLflow's and Prefect's own names), from stack.env."""


@contextmanager
def authenticated_stack(password: str, workers: int = 2, **environment: str) -> Iterator[Path]:
    """`soups stack up --workers N --auth` with the database password planted and the servers' credentials
    generated into stack.env, this process then a client of it like a sourced shell; stopped (PostgreSQL
    included, restarted or not) and removed afterwards. More than one worker: as many GPUs as far as the stack
    can tell (CPU-only here, torch finds none and trains on CPU)."""
    import pytest

    from deployments.postgres import running_postmaster
    from deployments.stack import PASSWORD_VARIABLE, down, sourced_environment

    root = stack_folder() / "stack"
    soups = str(Path(sys.executable).with_name("soups"))
    with pytest.MonkeyPatch.context() as patch:
        for variable, value in {PASSWORD_VARIABLE: password, "PGPASSWORD": password, **environment}.items():
            patch.setenv(variable, value)
        patch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        for variable in ("SOUPS_MLFLOW_ADMIN_PASSWORD", "SOUPS_MLFLOW_PASSWORD", "SOUPS_PREFECT_AUTH_STRING"):
            patch.delenv(variable, raising=False)
        gpus = {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(workers))} if workers > 1 else {}
        try:
            started = time.perf_counter()
            argv = [soups, "stack", "up", "--root", str(root), "--workers", str(workers), "--auth"]
            assert subprocess.run(argv, env={**os.environ, **gpus}).returncode == 0
            print(f"soups stack up --workers {workers} --auth: {time.perf_counter() - started:.1f}s")
            sourced = sourced_environment(root)
            for variable in CLIENT_VARIABLES:
                patch.setenv(variable, sourced[variable])
            yield root
        finally:
            down(root)
            stopped = running_postmaster(root) is None
            shutil.rmtree(root.parent)
        assert stopped, "soups stack down left the stack's PostgreSQL running"
