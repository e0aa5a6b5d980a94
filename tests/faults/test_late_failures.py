"""A kitchen that fails at its last steps loses nothing: real faults (promotion's lock path taken by a folder,
a soup's package path taken by a file), one line on the terminal, the cooked work kept, and `soups kitchen`
going on from there without cooking again; real Prefect, MLflow on sqlite and Optuna, no mocks."""

from __future__ import annotations

import shutil
from pathlib import Path

from mlflow import MlflowClient

from cli.main import main

EXPERIMENT = "digits-soups"


def _settings(root: Path, pretrained: Path) -> list[str]:
    settings = [
        f"tracking.root={root}",
        f"model.pretrained={pretrained}",
        "sweep.n_trials=2",
        "space={lr: {kind: loguniform, low: 1.0e-4, high: 3.0e-4}, epochs: {kind: int, low: 1, high: 1}}",
        "kitchen.recipes=[best, uniform, {name: wise_ft, options: {alphas: [0.5]}}]",
        "kitchen.bootstrap=100",
    ]
    return [x for s in settings for x in ("--set", s)]


def _client(root: Path) -> MlflowClient:
    uri = f"sqlite:///{(root / 'mlflow.db').resolve()}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _kitchens(client: MlflowClient):
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    return experiment_id, client.search_runs([experiment_id], "tags.kind = 'kitchen'")


def _error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if "error:" in line]


def _kept(workdir: Path) -> dict[str, int]:
    """Cooked checkpoints and records, with their modification times: cooking again would change them."""
    files = [*(workdir / "soups").glob("*.safetensors"), *(workdir / "cooked").glob("*.json")]
    return {str(f.relative_to(workdir)): f.stat().st_mtime_ns for f in files}


def test_a_kitchen_failing_late_keeps_its_work_and_goes_on_without_cooking_again(
    prefect_server, pretrained_checkpoint, tmp_path, capsys
):
    root = tmp_path / "soups-data"
    settings = _settings(root, pretrained_checkpoint)
    assert main(["sweep", *settings]) == 0
    lock = root / f".promote-{EXPERIMENT}.lock"
    lock.mkdir()  # promotion cannot take its lock
    capsys.readouterr()

    assert main(["kitchen", *settings]) == 1
    (line,) = _error_lines(capsys)
    assert "promote failed at candidate" in line and "IsADirectoryError" in line and "`soups kitchen` again" in line
    client = _client(root)
    experiment_id, (kitchen,) = _kitchens(client)
    assert kitchen.info.status == "FAILED" and kitchen.data.tags["failed_step"] == "promote"
    assert "promote failed" in kitchen.data.tags["failure_reason"]
    workdir = root / "kitchen" / kitchen.info.run_id
    assert "Traceback" in (workdir / "failure.txt").read_text()
    assert (workdir / "report.md").is_file() and (workdir / "leaderboard.csv").is_file()
    kept = _kept(workdir)
    assert {"soups/uniform.safetensors", "soups/wise_ft_0p50.safetensors", "cooked/ingredients.json"} <= set(kept)
    soups = {v.tags["candidate"]: v for v in client.search_model_versions(f"name='{EXPERIMENT}'")}
    assert "wise_ft_0.50" in soups and soups["wise_ft_0.50"].tags["stored_name"] == "wise_ft_0p50"

    # Registration that did not happen for one soup: its version and its uploaded model are gone, and the
    # folder its package is written to is taken by a file.
    uniform = soups["uniform"]
    client.delete_model_version(EXPERIMENT, uniform.version)
    (package,) = client.search_logged_models([experiment_id], filter_string="name = 'uniform'")
    client.delete_logged_model(package.model_id)
    lock.rmdir()
    blocker = workdir / "packages"
    shutil.rmtree(blocker)
    blocker.write_text("not a folder")
    assert main(["kitchen", *settings]) == 1
    (line,) = _error_lines(capsys)
    assert "register-soups failed at candidate 'uniform'" in line
    assert client.get_run(kitchen.info.run_id).data.tags["failed_step"] == "register-soups"

    blocker.unlink()
    assert main(["kitchen", *settings]) == 0
    _, kitchens = _kitchens(client)
    assert [k.info.run_id for k in kitchens] == [kitchen.info.run_id], "the same kitchen run went on"
    resumed = client.get_run(kitchen.info.run_id)
    assert resumed.info.status == "FINISHED" and "register-soups failed" in resumed.data.tags["previous_failure"]
    assert "failure_reason" not in resumed.data.tags
    assert _kept(workdir) == kept, "nothing cooked or scored again"
    after = {v.tags["candidate"]: v for v in client.search_model_versions(f"name='{EXPERIMENT}'")}
    assert set(after) == set(soups) and after["uniform"].version != uniform.version, "the missing one registered"
    assert after["wise_ft_0.50"].version == soups["wise_ft_0.50"].version, "the registered ones kept"
    nested = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{kitchen.info.run_id}'")
    names = [run.info.run_name for run in nested]
    assert len(names) == len(set(names)), "no soup run made twice"
    assert all(run.info.status == "FINISHED" for run in nested)
    champion = client.get_model_version_by_alias(EXPERIMENT, "champion")
    assert champion.tags["candidate"] in after
