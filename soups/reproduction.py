"""A reproduction report per study, modelled on the paper's Table 1 and Figure 1: every recipe and baseline
with held-out, test and each shift set (with 95 % intervals), the orderings the data resolves, and the
figures. Markdown, so it pastes into a lab notebook and renders in MLflow's artifact view."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

from soups.cooking import INGREDIENT
from soups.recipes import RECIPES
from soups.report import accuracy_columns


def _cell(row: pd.Series, column: str) -> str:
    value = f"{100 * row[column]:.1f}"
    if f"{column}_lo" not in row.index:
        return value
    return f"{value} ({100 * row[f'{column}_lo']:.1f}–{100 * row[f'{column}_hi']:.1f})"


def _table(rows: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    lines = ["| model | " + " | ".join(columns) + " | ingredients |", "|---" * (len(columns) + 2) + "|"]
    for _, row in rows.iterrows():
        cells = " | ".join(_cell(row, c) for c in columns)
        lines.append(f"| {row.model} | {cells} | {row.ingredients} |")
    return lines


def paper_rows(board: pd.DataFrame) -> pd.DataFrame:
    """The rows of the paper's Table 1 that were cooked, in its order (`Recipe.paper_row`): each recipe's plain
    entry, and of a sweep recipe's points (WiSE-FT's α) the one with the best held-out score."""
    rows = []
    for recipe in sorted((r for r in RECIPES.values() if r.paper_row is not None), key=lambda r: r.paper_row):
        cooked = board[board.recipe == recipe.name]
        if recipe.sweep is None:
            cooked = cooked[cooked.model.isin(recipe.default_names())]
        if len(cooked):
            rows.append(cooked.iloc[0])  # the board is ordered by held-out selection already
    return pd.DataFrame(rows).reset_index(drop=True)


def comparisons() -> list[tuple[str, str]]:
    """(row, the row the paper reports it beating), as the recipes declare them (`Recipe.compared_with`)."""
    return [(recipe.default_names()[0], other) for recipe in RECIPES.values() for other in recipe.compared_with]


def resolved_orderings(board: pd.DataFrame, column: str) -> list[str]:
    """For the paper's comparisons, whether the data separates the two models on ``column`` (intervals that
    do not overlap) or not; without intervals nothing is claimed."""
    if f"{column}_lo" not in board.columns:
        return []
    by_name = board.set_index("model")
    lines = []
    for a, b in comparisons():
        if a not in by_name.index or b not in by_name.index:
            continue
        first, second = by_name.loc[a], by_name.loc[b]
        if first[f"{column}_lo"] > second[f"{column}_hi"]:
            verdict = f"**{a} > {b}** (intervals do not overlap)"
        elif second[f"{column}_lo"] > first[f"{column}_hi"]:
            verdict = f"**{b} > {a}** (intervals do not overlap)"
        else:
            verdict = f"{a} vs {b}: not resolved (intervals overlap)"
        lines.append(f"- {column}: {verdict}; {100 * first[column]:.1f} vs {100 * second[column]:.1f}")
    return lines


def reproduction_report(
    board: pd.DataFrame,
    *,
    study: str,
    split_sizes: Mapping[str, int],
    figures: Sequence[str],
    resamples: int,
    skipped: Mapping[str, str] | None = None,
) -> str:
    """The whole report as markdown; ``figures`` are file names logged beside it; ``skipped``: registered
    ingredient versions left out of this kitchen, with why."""
    columns = accuracy_columns(board)
    ingredients = int((board.recipe == INGREDIENT).sum())
    sizes = ", ".join(f"{name} {count}" for name, count in split_sizes.items())
    interval = f"95 % bootstrap intervals over images ({resamples} resamples, seeded)" if resamples else "no intervals"
    lines = [
        f"# Model soups: reproduction report for study `{study}`",
        "",
        f"{ingredients} ingredients. Accuracy in %, {interval}. Images per split: {sizes}.",
        "`heldout` is the scoring part of the held-out split: it selects (greedy, promotion); test and the shift",
        "sets only report. `shift_mean` is the mean over the shift sets, the paper's OOD score.",
        "",
        "## The paper's table",
        "",
        *_table(paper_rows(board), columns),
        "",
        "## What the data resolves",
        "",
        *(resolved_orderings(board, "test") + resolved_orderings(board, "shift_mean") or ["- (no intervals)"]),
        "",
        "## Figures",
        "",
        *[f"![{name}]({name})" for name in figures],
        "",
        "## Every candidate",
        "",
        *_table(board, columns),
        "",
        *(
            ["## Ingredients left out", "", *[f"- version {v}: {why}" for v, why in skipped.items()], ""]
            if skipped
            else []
        ),
    ]
    return "\n".join(lines)
