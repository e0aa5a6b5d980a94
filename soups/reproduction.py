"""A reproduction report per study, modelled on the paper's Table 1 and Figure 1: every recipe and baseline
with held-out, test and each shift set (with 95 % intervals), the paper's published numbers when the experiment
follows a paper preset, the paper's comparisons judged by a paired test on the same images, and the figures.
Markdown, so it pastes into a lab notebook and renders in MLflow's artifact view."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import pandas as pd

from soups.candidates import INGREDIENT
from soups.intervals import PairedDifference
from soups.recipes import RECIPES
from soups.report import accuracy_columns, in_sample

Compare = Callable[[str, str, str], PairedDifference | None]
"""(first label, second label, score) -> first minus second, paired over the same images (None: no intervals)."""


def _cell(row: pd.Series, column: str) -> str:
    value = f"{100 * row[column]:.1f}"
    if f"{column}_lo" in row.index:
        value += f" ({100 * row[f'{column}_lo']:.1f}–{100 * row[f'{column}_hi']:.1f})"
    return value + ("*" if column in in_sample(row) else "")


def _table(rows: pd.DataFrame, columns: Sequence[str], paper: str | None = None) -> list[str]:
    published = [f"paper {column}" for column in ("ImageNet", "shifts")] if paper else []
    lines = [
        "| model | " + " | ".join([*columns, *published]) + " | ingredients |",
        "|---" * (len(columns) + len(published) + 2) + "|",
    ]
    for _, row in rows.iterrows():
        cells = [_cell(row, c) for c in columns]
        if paper:
            numbers = RECIPES[row.recipe].published.get(paper) if row.recipe in RECIPES else None
            cells += [f"{n:.2f}" for n in numbers] if numbers else ["–", "–"]
        lines.append(f"| {row.model} | {' | '.join(cells)} | {row.ingredients} |")
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


def resolved_orderings(board: pd.DataFrame, column: str, compare: Compare) -> list[str]:
    """For the paper's comparisons, the accuracy difference on ``column`` with its 95 % paired bootstrap
    interval (both models resampled on the same images), and whether it excludes 0."""
    cooked = set(board.model)
    lines = []
    for a, b in comparisons():
        if a not in cooked or b not in cooked:
            continue
        paired = compare(a, b, column)
        if paired is None:
            return []
        if paired.resolved:
            winner, loser = (a, b) if paired.difference > 0 else (b, a)
            verdict = f"**{winner} > {loser}**: {a} − {b} = {paired} (the interval excludes 0)"
        else:
            verdict = f"{a} vs {b}: not resolved, {a} − {b} = {paired} (the interval includes 0)"
        lines.append(f"- {column}: {verdict}")
    return lines


def reproduction_report(
    board: pd.DataFrame,
    *,
    study: str,
    split_sizes: Mapping[str, int],
    figures: Sequence[str],
    resamples: int,
    compare: Compare,
    whole_heldout: bool = False,
    paper: str | None = None,
    skipped: Mapping[str, str] | None = None,
) -> str:
    """The whole report as markdown; ``figures`` are file names logged beside it; ``compare`` judges two
    candidates on the same images; ``whole_heldout``: the official protocol (learned soups fit on all of
    held-out); ``paper``: the preset whose published numbers stand beside ours; ``skipped``: registered
    ingredient versions left out of this kitchen, with why."""
    columns = accuracy_columns(board)
    ingredients = int((board.recipe == INGREDIENT).sum())
    sizes = ", ".join(f"{name} {count}" for name, count in split_sizes.items())
    interval = f"95 % bootstrap intervals over images ({resamples} resamples, seeded)" if resamples else "no intervals"
    heldout = (
        "`heldout` is the whole held-out split: learned soups fit on it, and it selects (greedy, promotion); values "
        "marked * are in-sample (the learned soups' own fitting images) and never promote them."
        if whole_heldout
        else "`heldout` is the scoring part of the held-out split (learned soups fit on the other part): it selects "
        "(greedy, promotion)."
    )
    resolved = resolved_orderings(board, "test", compare) + resolved_orderings(board, "shift_mean", compare)
    lines = [
        f"# Model soups: reproduction report for study `{study}`",
        "",
        f"{ingredients} ingredients. Accuracy in %, {interval}. Images per split: {sizes}.",
        heldout,
        "Held-out intervals describe the images that selected the models, not evidence that one is better; test and",
        "the shift sets only report. `shift_mean` is the mean over the shift sets, the paper's OOD score.",
        "",
        "## The paper's table",
        "",
        *(
            [
                f"`paper` columns: the paper's published `{paper}` numbers (ImageNet top-1, mean of 5 shifts).",
                "",
            ]
            if paper
            else []
        ),
        *_table(paper_rows(board), columns, paper),
        "",
        "## What the data resolves",
        "",
        "Each of the paper's comparisons by a paired test: the accuracy difference on the same images with its 95 %",
        f"paired bootstrap interval ({resamples} resamples of the images, both models resampled alike).",
        "",
        *(resolved or ["- (no intervals: kitchen.bootstrap is 0)"]),
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
