"""The kitchen's report: the leaderboard (MLflow table, CSV, Prefect table), every figure the kitchen and the
recipes declare, and the reproduction report, logged once to the kitchen run."""

from __future__ import annotations

import json

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from soups.candidates import Candidate
from soups.cooking import CookingSetup
from tasks.adapters.tracking import run_url
from tasks.context import RunContext
from tasks.cooking import cooked_record


@task(name="log-kitchen-report", cache_policy=NO_CACHE)
def log_kitchen_report(
    run: RunContext, setup: CookingSetup, candidates: list[Candidate], skipped: dict[str, str]
) -> list[dict]:
    """Leaderboard (MLflow table + CSV + Prefect table), figures and the reproduction report (its comparisons
    paired on the evaluator's images), logged to the kitchen run; ``skipped``: registered ingredient versions
    left out, with why."""
    import matplotlib.pyplot as plt

    from soups.report import kitchen_figures, leaderboard
    from soups.reproduction import reproduction_report

    config, client, run_id, workdir = run.config, run.client, run.run_id, run.workdir
    board = leaderboard(candidates)
    logged = cooked_record(workdir, "report")
    if logged.is_file():  # a resumed kitchen: the same candidates, already reported (log_table would append)
        print(f"leaderboard, figures and report.md were logged before this kitchen failed ({logged})")
        return board.to_dict("records")
    csv_path = workdir / "leaderboard.csv"
    board.to_csv(csv_path, index=False)
    client.log_artifact(run_id, str(csv_path))
    client.log_table(run_id, board, "leaderboard.json")
    create_table_artifact(
        board.round(4).to_dict("records"),
        key=f"{config.experiment.lower()}-leaderboard",
        description=f"Soup leaderboard of study {config.study_name}; the kitchen's MLflow run: "
        f"{run_url(config.tracking, client, run_id)}",
    )
    figures = kitchen_figures(candidates, board)
    for name, figure in figures.items():
        client.log_figure(run_id, figure, name)
        plt.close(figure)
    hits = {c.name: c.hits for c in candidates}
    report = reproduction_report(
        board,
        study=config.study_name,
        split_sizes={name: len(split) for name, split in setup.evaluator.splits.items()},
        figures=list(figures),
        resamples=config.kitchen.bootstrap,
        compare=lambda first, second, score: setup.evaluator.paired(hits[first], hits[second], score),
        whole_heldout=bool(setup.fit_scored),
        paper=config.kitchen.paper,
        skipped=skipped,
    )
    report_path = workdir / "report.md"
    report_path.write_text(report)
    client.log_artifact(run_id, str(report_path))
    print(f"reproduction report: {report_path}")
    logged.write_text(json.dumps({"figures": sorted(figures), "report": str(report_path)}))
    return board.to_dict("records")
