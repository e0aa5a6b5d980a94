"""What people look at after a kitchen run: the leaderboard and its figures (no tracking code here)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from soups.candidates import INGREDIENT, Candidate
from soups.figures import canvas
from soups.splits import HELDOUT, HELDOUT_LOSS


def leaderboard(candidates: Sequence[Candidate]) -> pd.DataFrame:
    """One row per model: every accuracy (the evaluator's columns, in its order) with ``<column>_lo`` /
    ``<column>_hi`` 95 % bounds when intervals were computed, held-out loss, number of ingredients and the
    in-sample scores (comma-separated, usually empty); ordered as `soups.selection` orders them (held-out
    accuracy, then lower held-out loss, then fewer ingredients; cooking order on a full tie)."""
    rows = []
    for c in candidates:
        bounds = {f"{k}_{side}": v for k, (lo, hi) in c.intervals.items() for side, v in (("lo", lo), ("hi", hi))}
        rows.append(
            {
                "model": c.name,
                "recipe": c.recipe,
                **c.scores,
                **bounds,
                "ingredients": len(c.ingredients),
                "in_sample": ",".join(c.in_sample),
            }
        )
    board = pd.DataFrame(rows)
    order = [HELDOUT, HELDOUT_LOSS, "ingredients"]
    return board.sort_values(order, ascending=[False, True, True], ignore_index=True, kind="stable")


def accuracy_columns(board: pd.DataFrame) -> list[str]:
    """The accuracy columns of a leaderboard, in the evaluator's order (no bounds, loss or counts)."""
    skip = {"model", "recipe", "ingredients", "heldout_loss", "in_sample"}
    return [c for c in board.columns if c not in skip and not c.endswith(("_lo", "_hi"))]


def with_intervals(board: pd.DataFrame, row: int, column: str, digits: int = 4) -> str:
    """'0.9663 [0.91,0.99]' when the column has bounds, else '0.9663'; '*' after an in-sample score."""
    value = f"{board.at[row, column]:.{digits}f}"
    if f"{column}_lo" in board.columns:
        value += f" [{board.at[row, f'{column}_lo']:.2f},{board.at[row, f'{column}_hi']:.2f}]"
    return value + ("*" if column in in_sample(board.loc[row]) else "")


def in_sample(row: pd.Series) -> list[str]:
    """The scores of a leaderboard row measured on the images it was fitted to (marked * where shown)."""
    marked = row.get("in_sample")
    return marked.split(",") if isinstance(marked, str) and marked else []


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


def kitchen_figures(candidates: Sequence[Candidate], board: pd.DataFrame) -> dict[str, Any]:
    """Every figure of a kitchen by file name: the paper's Figure 1 (test and held-out against shift), then per
    candidate, in the order they were cooked, the figures its recipe declares and its grid's curve when tuned
    (``<stored name>_<suffix>.png``: each candidate's own, however many share a recipe)."""
    lines = sweep_lines(candidates)
    figures = {
        "accuracy_vs_shift.png": accuracy_vs_shift_figure(board, lines=lines),
        "heldout_vs_shift.png": accuracy_vs_shift_figure(board, y="heldout", lines=lines),
    }
    for c in candidates:
        recipe = c.made_by
        if recipe is not None and recipe.figures is not None:
            for suffix, figure in recipe.figures(c.details, c.ingredients).items():
                figures[f"{c.stored_name}_{suffix}.png"] = figure
        if c.tuned is not None:
            figures[f"{c.stored_name}_grid.png"] = grid_figure(c.name, c.grid, c.tuned)
    return figures


def sweep_lines(candidates: Sequence[Candidate]) -> dict[str, list[str]]:
    """Legend -> the labels of a sweep recipe's points in the order cooked, from its origin when it was cooked
    (WiSE-FT's α line starts at the zero-shot model, α = 0)."""
    cooked = {c.name for c in candidates}
    lines: dict[str, list[str]] = {}
    for c in candidates:
        sweep = c.made_by.sweep if c.made_by is not None else None
        if sweep is not None:
            start = [sweep.origin] if sweep.origin in cooked else []
            lines.setdefault(sweep.legend, start).append(c.name)
    return lines


def accuracy_vs_shift_figure(board: pd.DataFrame, y: str = "test", lines: dict[str, list[str]] | None = None):
    """The paper's Figure 1: in-distribution accuracy against mean shift accuracy; ingredients as grey dots,
    each other model a marker with its 95 % bounds, each sweep (``lines``: legend -> labels) one dashed line."""
    lines = lines or {}
    on_lines = {label for labels in lines.values() for label in labels[1:]}
    fig, ax = canvas(7, 5)
    ingredients = board[board.recipe == INGREDIENT]
    ax.scatter(ingredients.shift_mean, ingredients[y], c="0.6", label="ingredients", s=25)
    markers = iter("*s^DvP<>ohX")
    for _, row in board[(board.recipe != INGREDIENT) & ~board.model.isin(on_lines)].iterrows():
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
    by_model = board.set_index("model")
    for legend, labels in lines.items():
        if len(labels) > 1:
            points = by_model.loc[labels]
            ax.plot(points.shift_mean, points[y], "--", c="tab:purple", lw=1, marker=".", label=legend)
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


def grid_figure(name: str, curve: Sequence[dict[str, Any]], chosen: dict[str, Any]):
    """Held-out accuracy of every grid point a recipe was tuned over, the chosen one marked (like WiSE-FT's α)."""
    fig, ax = canvas(7, 4)
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
