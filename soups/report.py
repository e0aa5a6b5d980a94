"""What people look at after a kitchen run: the leaderboard and three figures (no tracking code here)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from soups.cooking import Candidate


def leaderboard(candidates: Sequence[Candidate]) -> pd.DataFrame:
    """One row per model: held-out, test, each shift, shift mean (the evaluator's accuracy columns, in its
    order), number of ingredients; best held-out first."""
    rows = [
        {
            "model": c.name,
            "recipe": c.recipe,
            **{k: v for k, v in c.scores.items() if k != "heldout_loss"},
            "ingredients": len(c.ingredients),
        }
        for c in candidates
    ]
    return pd.DataFrame(rows).sort_values("heldout", ascending=False, ignore_index=True)


def accuracy_vs_shift_figure(board: pd.DataFrame, y: str = "test"):
    """The paper's Figure 1: in-distribution accuracy against mean shift accuracy, ingredients and soups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    ingredients = board[board.recipe == "ingredient"]
    ax.scatter(ingredients.shift_mean, ingredients[y], c="0.6", label="ingredients", s=25)
    markers = iter("*s^DvP<>ohX")
    for _, row in board[board.recipe != "ingredient"].iterrows():
        if row.recipe == "wise_ft":
            continue
        ax.scatter(row.shift_mean, row[y], marker=next(markers, "o"), s=90, label=row.model)
    wise = board[board.recipe == "wise_ft"].sort_values("model")
    if len(wise):
        ax.plot(wise.shift_mean, wise[y], "--", c="tab:purple", lw=1, marker=".", label="WiSE-FT (α sweep)")
    ax.set_xlabel("mean accuracy over shift sets")
    ax.set_ylabel(f"{y} accuracy")
    ax.set_title(f"{y} vs distribution-shift accuracy")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def greedy_trajectory_figure(trajectory: Sequence[dict[str, Any]]):
    """Held-out score of each candidate soup, in the order the greedy recipe tried them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = range(1, len(trajectory) + 1)
    ax.plot(steps, [s["ingredient_score"] for s in trajectory], "o-", c="0.6", label="ingredient alone")
    colours = ["tab:green" if s["accepted"] else "tab:red" for s in trajectory]
    ax.scatter(
        steps,
        [s["candidate_score"] for s in trajectory],
        c=colours,
        s=60,
        zorder=3,
        label="soup with it (green: kept, red: dropped)",
    )
    ax.set_xticks(list(steps), [s["ingredient"] for s in trajectory], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("held-out accuracy")
    ax.set_title("greedy soup trajectory (best ingredient first)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def mixing_weights_figure(coefficients: list[float] | dict[str, list[float]], ingredient_names: Sequence[str]):
    """Learned soup weights: a bar per ingredient (global) or a heat map of tensors × ingredients (by layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(coefficients, dict):
        keys = list(coefficients)
        fig, ax = plt.subplots(figsize=(max(5, len(ingredient_names) * 0.6), max(4, len(keys) * 0.12)))
        image = ax.imshow([coefficients[k] for k in keys], aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(keys)), keys, fontsize=4)
        fig.colorbar(image, ax=ax, label="weight")
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.bar(range(len(coefficients)), coefficients)
        ax.set_ylabel("weight")
    ax.set_xticks(range(len(ingredient_names)), ingredient_names, rotation=45, ha="right", fontsize=7)
    ax.set_title("learned soup mixing weights")
    fig.tight_layout()
    return fig
