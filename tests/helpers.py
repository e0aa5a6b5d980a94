"""Small checkpoint factories shared by the tests."""

from __future__ import annotations

import os
import tempfile
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
