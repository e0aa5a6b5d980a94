"""The platform end to end on a tiny config: real Prefect server, MLflow (sqlite) and Optuna (sqlite)."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from flows.kitchen import kitchen_flow
from flows.pipeline import pipeline_flow
from flows.promote import promote_flow
from flows.sweep import sweep_flow
from soups.config import PipelineConfig, load_config
from soups.data import load_dataset
from soups.images import Preprocess, decode
from soups.models import empty_classifier
from soups.names import stored_name

EXPERIMENT = "test-soups"
PARENT = "mlflow.parentRunId"
RECIPES = [
    "best",
    "uniform",
    "greedy",
    "learned",
    "learned_by_layer",
    "ensemble",
    "greedy_ensemble",
    "zero_shot",
    "wise_ft",
]


def _config(root, **overrides) -> PipelineConfig:
    settings = {
        "experiment": EXPERIMENT,
        "tracking.root": str(root),
        "sweep.n_trials": 3,
        "sweep.sampler": "random",
        "sweep.seed": 1,
        "space": {
            "lr": {"kind": "loguniform", "low": 3e-4, "high": 1e-3},
            "epochs": {"kind": "int", "low": 1, "high": 2},
            "label_smoothing": {"kind": "uniform", "low": 0.0, "high": 0.2, "or_zero": True},
        },
        "kitchen.recipes": [
            "best",
            "uniform",
            "greedy",
            {"name": "learned", "options": {"epochs": 10}},
            {"name": "learned_by_layer", "options": {"epochs": 10}},
            "ensemble",
            "greedy_ensemble",
            "zero_shot",
            {"name": "wise_ft", "options": {"alphas": [0.5, 1.0]}},
        ],
        **overrides,
    }
    return load_config(None, settings)


def _client(config: PipelineConfig) -> MlflowClient:
    uri = config.tracking.resolved_mlflow_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _versions(client: MlflowClient, name: str, study: str) -> list:
    return [v for v in client.search_model_versions(f"name='{name}'") if v.tags.get("study") == study]


@pytest.fixture(scope="module")
def first_run(prefect_server, tmp_path_factory):
    config = _config(tmp_path_factory.mktemp("platform"))
    return config, pipeline_flow(config)


def test_every_finished_trial_is_one_registered_ingredient(first_run):
    config, result = first_run
    finished = result["sweep"]["finished"]
    assert len(finished) == 3 and not result["sweep"]["failed"]
    versions = _versions(_client(config), f"{EXPERIMENT}-ingredients", config.study_name)
    assert len(versions) == len(finished)
    for version in versions:
        assert {"study", "trial_number", "heldout_accuracy", "sha256"} <= set(version.tags)
        assert len(version.tags["sha256"]) == 64
    assert sorted(int(v.tags["trial_number"]) for v in versions) == [0, 1, 2]
    study = optuna.load_study(study_name=config.study_name, storage=config.tracking.resolved_optuna_storage())
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    run = _client(config).get_run(finished[0]["run_id"])
    assert run.data.params["train.lr"] and "heldout_accuracy" in run.data.metrics
    history = _client(config).get_metric_history(run.info.run_id, "heldout_accuracy")
    epochs = int(run.data.params["train.epochs"])
    assert sorted(m.step for m in history) == list(range(1, epochs + 1)), "one point per epoch, no step-0 repeat"
    assert run.inputs.dataset_inputs and run.inputs.dataset_inputs[0].dataset.name == "digits-train"
    assert run.data.tags["mlflow.parentRunId"] == result["sweep"]["parent_run_id"]


def test_leaderboard_has_every_recipe_and_greedy_is_not_worse_than_the_best_ingredient(first_run):
    _, result = first_run
    board = result["kitchen"]["leaderboard"]
    assert {row["recipe"] for row in board} >= {*RECIPES, "ingredient"}
    assert {"heldout", "test", "rotate", "noise", "blur", "invert", "shift_mean", "ingredients"} <= set(board[0])
    greedy = next(r for r in board if r["recipe"] == "greedy")
    best_ingredient = max(r["heldout"] for r in board if r["recipe"] == "ingredient")
    assert greedy["heldout"] >= best_ingredient
    assert next(r for r in board if r["recipe"] == "uniform")["ingredients"] == 3


def test_soups_are_registered_with_lineage_and_the_champion_predicts(first_run):
    config, result = first_run
    client = _client(config)
    soups = _versions(client, EXPERIMENT, config.study_name)
    assert {v.tags["recipe"] for v in soups} >= {"uniform", "learned", "learned_by_layer", "best"}
    registered = result["kitchen"]["registered"]
    assert {r["recipe"] for r in registered} >= {"uniform", "greedy", "learned", "learned_by_layer", "best", "wise_ft"}
    assert {r["version"] for r in registered} == {str(v.version) for v in soups}, "identical weights share a version"
    ingredient_versions = {str(v.version) for v in _versions(client, f"{EXPERIMENT}-ingredients", config.study_name)}
    uniform = next(v for v in soups if v.tags["recipe"] == "uniform")
    assert set(uniform.tags["ingredient_versions"].split(",")) == ingredient_versions
    learned = next(v for v in soups if v.tags["recipe"] == "learned")
    assert len(json.loads(learned.tags["coefficients"])) == 3

    champion = client.get_model_version_by_alias(EXPERIMENT, "champion")
    assert str(champion.version) == result["kitchen"]["promotion"]["candidate_version"]
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    logged = {model.name for model in client.search_logged_models([experiment_id])}
    assert {v.tags["stored_name"] for v in soups} <= logged, "each soup is a logged model named after its candidate"
    mlflow.set_tracking_uri(config.tracking.resolved_mlflow_uri())
    model = mlflow.pyfunc.load_model(f"models:/{EXPERIMENT}@champion")
    preprocess = Preprocess.of(empty_classifier(config.model.name, 10))
    images = decode(load_dataset(config.data).test, preprocess).images[:8].permute(0, 2, 3, 1).numpy()
    predictions = model.predict(images)
    classnames = load_dataset(config.data).classnames
    assert list(predictions.columns) == ["predicted_class", *classnames]
    probabilities = predictions[classnames].to_numpy()
    assert probabilities.shape == (8, 10) and np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert list(predictions["predicted_class"]) == [classnames[i] for i in probabilities.argmax(axis=1)]
    example = model.input_example
    assert example.dtype == np.uint8 and example.shape[1:] == images.shape[1:]
    ingredient = mlflow.pyfunc.load_model(f"models:/{EXPERIMENT}-ingredients/1")  # ingredients load the same way
    assert list(ingredient.predict(images).columns) == ["predicted_class", *classnames]


def test_every_leaderboard_row_can_be_found_as_a_run_and_ingredients_carry_their_kitchen_scores(first_run):
    config, result = first_run
    client = _client(config)
    kitchen_run = result["kitchen"]["run_id"]
    experiment = client.get_experiment_by_name(EXPERIMENT)
    nested = client.search_runs([experiment.experiment_id], f"tags.`{PARENT}` = '{kitchen_run}'")
    rows = [row for row in result["kitchen"]["leaderboard"] if row["recipe"] != "ingredient"]
    assert {row["model"] for row in rows} <= {run.data.tags["candidate"] for run in nested}
    assert all(run.info.run_name == stored_name(run.data.tags["candidate"]) for run in nested)
    wise = [run for run in nested if run.data.tags["recipe"] == "wise_ft"]
    assert len(wise) > 1 and all("heldout" in run.data.metrics for run in wise), "each WiSE-FT α is a run"
    evaluated = client.get_run(kitchen_run).inputs.dataset_inputs
    assert {"heldout", "test"} <= {i.dataset.name.rsplit("-", 1)[-1] for i in evaluated}
    scores = {row["model"]: row["heldout"] for row in result["kitchen"]["leaderboard"]}
    for version in _versions(client, f"{EXPERIMENT}-ingredients", config.study_name):
        assert version.tags["kitchen.run_id"] == kitchen_run
        kitchen_score = scores[f"trial-{version.tags['trial_number']}"]  # the leaderboard row of that trial's run
        assert float(version.tags["kitchen.heldout"]) == pytest.approx(kitchen_score, abs=1e-4)
        assert "heldout_accuracy" in version.tags  # the whole held-out split, as the trial measured it


def test_kitchen_logs_the_reproduction_report_and_the_learned_fit_curve(first_run):
    config, result = first_run
    client = _client(config)
    kitchen_run = result["kitchen"]["run_id"]
    assert {"report.md", "leaderboard.csv"} <= {a.path for a in client.list_artifacts(kitchen_run)}
    report = (config.tracking.root / "kitchen" / kitchen_run / "report.md").read_text()
    assert "| greedy |" in report and "greedy_trajectory.png" in report
    experiment = client.get_experiment_by_name(EXPERIMENT)
    query = f"tags.recipe = 'learned' and tags.`{PARENT}` = '{kitchen_run}'"
    (learned,) = client.search_runs([experiment.experiment_id], query)
    steps = [m.step for m in client.get_metric_history(learned.info.run_id, "fit_loss")]
    assert steps == list(range(1, 11)), "one fit-loss point per optimiser step"
    assert "lead" in result["kitchen"]["promotion"]["margin"]


def test_promotion_is_idempotent(first_run):
    config, _ = first_run
    client = _client(config)
    before = client.get_model_version_by_alias(EXPERIMENT, "champion").version
    decision = promote_flow(config)
    assert "unchanged" in decision["outcome"]
    assert client.get_model_version_by_alias(EXPERIMENT, "champion").version == before


def test_recooking_the_same_ingredients_registers_nothing_new(first_run):
    config, result = first_run
    client = _client(config)
    before = sorted(int(v.version) for v in client.search_model_versions(f"name='{EXPERIMENT}'"))
    again = kitchen_flow(config)
    after = sorted(int(v.version) for v in client.search_model_versions(f"name='{EXPERIMENT}'"))
    assert after == before, "identical weights keep their registered version"
    assert "unchanged" in again["promotion"]["outcome"]


def test_a_worse_run_leaves_the_champion_and_sets_a_challenger(first_run):
    config, _ = first_run
    client = _client(config)
    champion = client.get_model_version_by_alias(EXPERIMENT, "champion").version
    worse = _config(
        config.tracking.root,
        **{
            "sweep.study_name": "barely-trained",
            "sweep.n_trials": 2,
            "space": {
                "lr": {"kind": "loguniform", "low": 1e-9, "high": 2e-9},
                "epochs": {"kind": "int", "low": 1, "high": 1},
            },
        },
    )
    result = pipeline_flow(worse)
    assert result["kitchen"]["promotion"]["outcome"].startswith("challenger")
    assert client.get_model_version_by_alias(EXPERIMENT, "champion").version == champion
    challenger = client.get_model_version_by_alias(EXPERIMENT, "challenger")
    assert challenger.tags["study"] == "barely-trained"


def test_rerunning_the_sweep_continues_the_study(first_run):
    config, _ = first_run
    resumed = config.model_copy(update={"sweep": config.sweep.model_copy(update={"n_trials": 1})})
    result = sweep_flow(resumed)
    assert [t["number"] for t in result["finished"]] == [3]
    study = optuna.load_study(study_name=config.study_name, storage=config.tracking.resolved_optuna_storage())
    assert len(study.trials) == 4
    earlier = [t.params for t in study.trials[:3]]
    assert study.trials[3].params not in earlier, "a resumed study must not replay the first session's points"
    assert study.trials[3].user_attrs["seed"] == config.train.seed + 3


def test_a_failing_trial_is_recorded_failed_and_registers_nothing(first_run):
    config, _ = first_run
    diverging = _config(
        config.tracking.root,
        **{
            "sweep.study_name": "diverging",
            "sweep.seed": 0,  # random sampler, seed 0: lr 1e6, 3e-4, 1e6
            "sweep.parallel": 2,  # two trial tasks at once in the flow's thread pool
            "space": {
                "lr": {"kind": "categorical", "choices": [3e-4, 1e6]},
                "epochs": {"kind": "int", "low": 1, "high": 1},
            },
        },
    )
    result = sweep_flow(diverging)
    assert len(result["finished"]) == 1 and sorted(result["failed"]) == [0, 2]
    assert all("TrainingDivergedError" in reason for reason in result["failed"].values())
    study = optuna.load_study(study_name="diverging", storage=config.tracking.resolved_optuna_storage())
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.FAIL]
    assert "TrainingDivergedError" in study.trials[0].user_attrs["fail_reason"]
    client = _client(config)
    registered = _versions(client, f"{EXPERIMENT}-ingredients", "diverging")
    assert [v.tags["trial_number"] for v in registered] == ["1"]
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], "tags.study = 'diverging' and tags.kind = 'ingredient'")
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert len(failed) == 2 and all("TrainingDivergedError" in r.data.tags["failure_reason"] for r in failed)


def test_the_three_tools_link_to_each_other_and_the_registry_reads_well(first_run):
    from prefect.client.orchestration import get_client

    config, result = first_run
    client = _client(config)
    sweep_run = client.get_run(result["sweep"]["parent_run_id"])
    with get_client(sync_client=True) as prefect:
        flow_run = prefect.read_flow_run(sweep_run.data.tags["prefect.flow_run_id"])
    assert flow_run.name == f"sweep-{config.study_name}-3", "Prefect names the flow run after the study"
    assert {"mlflow.source.name", "mlflow.source.git.commit"} <= set(sweep_run.data.tags)
    assert "config.json" in {a.path for a in client.list_artifacts(sweep_run.info.run_id)}
    assert sweep_run.data.params["sweep.sampler"] == "random"
    trial_run = client.get_run(result["sweep"]["finished"][0]["run_id"])
    assert trial_run.data.tags["prefect.flow_run_id"] == sweep_run.data.tags["prefect.flow_run_id"]
    study = optuna.load_study(study_name=config.study_name, storage=config.tracking.resolved_optuna_storage())
    assert study.metric_names == ["heldout_accuracy"]
    assert study.trials[0].user_attrs["mlflow_run_id"] in {t["run_id"] for t in result["sweep"]["finished"]}
    for name in (EXPERIMENT, f"{EXPERIMENT}-ingredients"):
        assert client.get_registered_model(name).description, f"{name} has a description"
    versions = _versions(client, EXPERIMENT, config.study_name)
    assert all(v.description and "Held-out accuracy (which selects)" in v.description for v in versions)
    assert all(value != "" for v in versions for value in v.tags.values()), "no empty tags"
    wise = [v for v in versions if v.tags["recipe"] == "wise_ft"]
    assert all("alpha" in v.tags for v in wise)


def test_soups_serve_answers_with_the_champion_from_the_project_environment(first_run):
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    config, _ = first_run
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = "/usr/bin:/bin"  # not activated: the project's bin folder is not on PATH
    argv = [
        sys.executable,
        "-m",
        "cli.main",
        "serve",
        "--set",
        f"experiment={EXPERIMENT}",
        "--set",
        f"tracking.root={config.tracking.root}",
        "--port",
        str(port),
    ]
    server = subprocess.Popen(
        argv, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": images.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    predictions = json.loads(response.read())["predictions"]
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "soups serve did not come up"
                time.sleep(1)
        assert len(predictions) == 2 and all(row["predicted_class"] in row for row in predictions)
        names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
        assert list(predictions[0]) == ["predicted_class", *names]
        probabilities = np.asarray([[row[name] for name in names] for row in predictions])
        assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
