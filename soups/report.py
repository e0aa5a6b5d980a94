"""What people look at after a kitchen run: the leaderboard and three figures (no tracking code here)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from soups.cooking import Candidate


def leaderboard(candidates: Sequence[Candidate]) -> pd.DataFrame:
    """One row per model: every accuracy (the evaluator's columns, in its order) with ``<column>_lo`` /
    ``<column>_hi`` 95 % bounds when intervals were computed, held-out loss, number of ingredients; ordered
    as selection orders them (held-out accuracy, then lower held-out loss, then fewer ingredients)."""
    rows = []
    for c in candidates:
        bounds = {f"{k}_{side}": v for k, (lo, hi) in c.intervals.items() for side, v in (("lo", lo), ("hi", hi))}
        rows.append({"model": c.name, "recipe": c.recipe, **c.scores, **bounds, "ingredients": len(c.ingredients)})
    board = pd.DataFrame(rows)
    return board.sort_values(
        ["heldout", "heldout_loss", "ingredients"], ascending=[False, True, True], ignore_index=True
    )


def accuracy_columns(board: pd.DataFrame) -> list[str]:
    """The accuracy columns of a leaderboard, in the evaluator's order (no bounds, loss or counts)."""
    skip = {"model", "recipe", "ingredients", "heldout_loss"}
    return [c for c in board.columns if c not in skip and not c.endswith(("_lo", "_hi"))]


def with_intervals(board: pd.DataFrame, row: int, column: str, digits: int = 4) -> str:
    """'0.9663 [0.91,0.99]' when the column has bounds, else '0.9663'."""
    value = f"{board.at[row, column]:.{digits}f}"
    if f"{column}_lo" not in board.columns:
        return value
    return f"{value} [{board.at[row, f'{column}_lo']:.2f},{board.at[row, f'{column}_hi']:.2f}]"


def format_leaderboard(board: pd.DataFrame) -> str:
    """The leaderboard as printed: each accuracy with its 95 % interval in brackets."""
    shown = pd.DataFrame(
        {
            "model": board.model,
            "recipe": board.recipe,
            **{c: [with_intervals(board, i, c) for i in range(len(board))] for c in accuracy_columns(board)},
            "ingredients": board.ingredients,
        }
    )
    return shown.to_string(index=False)


def accuracy_vs_shift_figure(board: pd.DataFrame, y: str = "test"):
    """The paper's Figure 1: in-distribution accuracy against mean shift accuracy, ingredients and soups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    ingredients = board[board.recipe == "ingredient"]
    ax.scatter(ingredients.shift_mean, ingredients[y], c="0.6", label="ingredients", s=25)
    markers = iter("*s^DvP<>ohX")
    for _, row in board[~board.recipe.isin(["ingredient", "wise_ft"])].iterrows():
        ax.errorbar(
            row.shift_mean,
            row[y],
            xerr=_error(row, "shift_mean"),
            yerr=_error(row, y),
            marker=next(markers, "o"),
            markersize=9,
            capsize=2,
            lw=0.8,
            label=row.model,
        )
    wise = board[board.recipe.isin(["zero_shot", "wise_ft"])].sort_values("model", key=_zero_shot_first)
    if len(wise) > 1:
        ax.plot(wise.shift_mean, wise[y], "--", c="tab:purple", lw=1, marker=".", label="WiSE-FT (α sweep)")
    ax.set_xlabel("mean accuracy over shift sets")
    ax.set_ylabel(f"{y} accuracy")
    ax.set_title(f"{y} vs distribution-shift accuracy")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _error(row: pd.Series, column: str) -> list[list[float]] | None:
    """Asymmetric error bar lengths from a row's 95 % bounds, or none without intervals."""
    if f"{column}_lo" not in row.index:
        return None
    return [[row[column] - row[f"{column}_lo"]], [row[f"{column}_hi"] - row[column]]]


def _zero_shot_first(models: pd.Series) -> pd.Series:
    """WiSE-FT's α line starts at the zero-shot model (α = 0), then wise_ft_0.10 ... wise_ft_1.00."""
    return models.where(models != "zero_shot", "wise_ft_0.00")


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


def grid_figure(name: str, curve: Sequence[dict[str, Any]], chosen: dict[str, Any]):
    """Held-out accuracy of every grid point a recipe was tuned over, the chosen one marked (like WiSE-FT's α)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [", ".join(f"{k}={v}" for k, v in point["options"].items()) for point in curve]
    scores = [point["heldout"] for point in curve]
    ax.plot(range(len(curve)), scores, "o-", c="tab:blue")
    best = next(i for i, point in enumerate(curve) if point["options"] == chosen)
    ax.scatter([best], [scores[best]], s=150, facecolors="none", edgecolors="tab:red", label="chosen")
    ax.set_xticks(range(len(curve)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("held-out accuracy (scoring part)")
    ax.set_title(f"{name}: tuned on held-out")
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
