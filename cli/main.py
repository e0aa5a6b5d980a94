"""The ``soups`` command line. Heavy packages are imported inside the commands that use them, so
``soups --help`` and ``soups cook`` start in a second or so and never load Prefect or MLflow."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cli.common import UsageError, assignments, config_from
from cli.config_command import add_config_parsers
from cli.import_command import add_import_parser
from cli.prefect_runtime import prepare_environment, quiet_tracebacks, start_temporary_server
from cli.preflight import check_dispatch, check_pretrained, check_stores, unsafe_checkpoint
from cli.stack_command import add_stack_parser


def cook_command(args: argparse.Namespace) -> None:
    """Any recipe that needs only files (and ``--base`` for the ones built on the zero-shot start)."""
    from soups.checkpoint import CheckpointError, Ingredient, save_state_dict
    from soups.recipes import RecipeInputs, cook, get_recipe

    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; give a file name such as {out / 'soup.safetensors'}")
    if out.resolve() in {Path(p).resolve() for p in args.inputs}:
        raise UsageError(f"--out {out} is also an input; write the soup to a new file")
    options = assignments(args.param, "--param", "density=0.2")
    if args.dtype:
        options["dtype"] = args.dtype
    inputs = RecipeInputs(base=Path(args.base) if args.base else None)
    try:
        missing = inputs.missing(get_recipe(args.recipe).needs)
        if missing:
            hint = "pass --base with the zero-shot start" if missing == ["base"] else "cook it with `soups kitchen`"
            needed = ", ".join(missing)
            raise UsageError(f"recipe {args.recipe!r} needs {needed}, which files alone do not give; {hint}")
        ingredients = [Ingredient(Path(p)) for p in args.inputs]
        dishes = cook(args.recipe, ingredients, inputs, **options)
    except (CheckpointError, ValueError) as err:
        raise UsageError(str(err)) from err
    for dish in dishes:
        path = out if len(dishes) == 1 else out.with_name(f"{out.stem}-{dish.name}{out.suffix}")
        metadata = {"recipe": args.recipe, "options": json.dumps(options), "ingredients": ",".join(args.inputs)}
        save_state_dict(dish.state_dict, path, metadata)
        print(f"{dish.name} of {len(ingredients)} ingredients written to {path}")


def pretrain_command(args: argparse.Namespace) -> None:
    config = config_from(args)
    from soups.pretrain import needs_offline_start

    if not needs_offline_start(config):
        raise UsageError("this config fine-tunes from model.pretrained; set it to null and keep a pretrain section")
    from soups.pretrain import pretrain_start

    result = pretrain_start(config)
    print(f"zero-shot held-out accuracy {result.zero_shot_accuracy:.3f} after {result.seconds:.1f}s")
    print(f"pretrained checkpoint: {result.checkpoint}")


def stage_command(args: argparse.Namespace) -> None:
    """``soups run|sweep|kitchen|promote``: one stage (or all) as a Prefect flow run."""
    config = config_from(args)
    check_dispatch(config, args.command)
    if args.command not in ("run", "reap"):  # fail before a Prefect server starts; `run` pretrains when it must
        from soups.pretrain import with_resolved_start

        config = with_resolved_start(config, missing_ok=args.command != "sweep")
        check_pretrained(config.model.start)
    prepare_environment(config.tracking.root)
    experiment_id = check_stores(config, args.command)
    quiet_tracebacks()
    start_temporary_server(config.tracking)
    from prefect import tags

    # Every flow run of this command carries the experiment and study, to filter on in the Prefect UI.
    with tags(f"experiment:{config.experiment}", f"study:{config.study_name}"):
        _run_stage(args.command, config, experiment_id)


def _run_stage(command: str, config, experiment_id: str) -> None:
    started = time.perf_counter()
    if command == "run":
        from flows.pipeline import pipeline_flow

        result = pipeline_flow(config, experiment_id)
        _print_summary(config, result["kitchen"], time.perf_counter() - started)
    elif command == "sweep":
        from flows.sweep import sweep_flow

        result = sweep_flow(config, experiment_id)
        print(f"{len(result['finished'])} trials finished, {len(result['failed'])} failed or pruned")
    elif command == "kitchen":
        from flows.kitchen import kitchen_flow

        _print_summary(config, kitchen_flow(config, experiment_id), time.perf_counter() - started)
    elif command == "reap":
        _reap(config, experiment_id)
    else:
        from flows.promote import promote_flow

        print(promote_flow(config, experiment_id)["outcome"])


def _reap(config, experiment_id: str) -> None:
    """What killed sweeps left RUNNING, closed now (a running sweep does it every half heartbeat); each lost
    trial is asked again for the next sweep, which resumes it."""
    from tasks.adapters.reaping import reap_ghosts, retry_lost
    from tasks.adapters.studies import open_study
    from tasks.adapters.tracking import client_for
    from tasks.context import crash_flow_runs

    study, client = open_study(config), client_for(config.tracking)
    reaped = reap_ghosts(config, study, client, experiment_id)
    crash_flow_runs(reaped.flow_runs)
    retried = retry_lost(study, client, set(reaped.trials))
    print(
        f"reaped study {config.study_name!r}: {len(reaped.trials)} trials failed ({len(retried)} asked again for "
        f"the next sweep), {len(reaped.runs)} MLflow runs and {len(reaped.flow_runs)} Prefect flow runs closed"
    )


def _print_summary(config, kitchen: dict, seconds: float) -> None:
    import pandas as pd

    from soups.report import format_leaderboard

    board = pd.DataFrame(kitchen["leaderboard"])
    print("\nLeaderboard (accuracy [95 % interval]; held-out picks, test and shifts only report):")
    print(format_leaderboard(board))
    for version, why in kitchen.get("skipped_ingredients", {}).items():
        print(f"left out: ingredient version {version}: {why}")
    promotion = kitchen["promotion"]
    print(
        f"\nChampion decision: {promotion['candidate']} (version {promotion['candidate_version']}, "
        f"{promotion['metric']} {promotion['candidate_score']:.4f}) -> {promotion['outcome']}"
    )
    print(f"Margin: {promotion['margin']}")
    print(
        f"Finished in {seconds:.0f}s. Load it anywhere with "
        f"mlflow.pyfunc.load_model('models:/{config.experiment}@champion')."
    )
    tracking = config.tracking
    print("\nLook at it:")
    print(
        f"  MLflow UI:        mlflow ui --backend-store-uri {tracking.resolved_mlflow_uri()} "
        f"--default-artifact-root {tracking.artifact_root()}"
    )
    dashboard = f"optuna-dashboard {tracking.resolved_optuna_storage()}"
    print(f"  Optuna dashboard: pip install -c requirements.lock -e '.[ui]' && {dashboard}")
    print(f"  Prefect UI:       PREFECT_HOME={os.environ['PREFECT_HOME']} prefect server start")


def serve_command(args: argparse.Namespace) -> None:
    """``mlflow models serve`` of the promoted model from this project's environment, activated or not: MLflow
    starts uvicorn by name, so the interpreter's own bin folder goes first on PATH (without it: exit 127)."""
    config = config_from(args)
    model = f"models:/{config.experiment}@{args.alias}"
    _check_promoted(config, args.alias)
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
        "MLFLOW_TRACKING_URI": config.tracking.resolved_mlflow_uri(),
    }
    argv = [str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", model, "--env-manager", "local"]
    argv += ["-h", args.host, "-p", str(args.port)]
    print(f"serving {model} on http://{args.host}:{args.port}/invocations (uint8 images [batch, H, W, 3])")
    sys.stdout.flush()
    os.execve(argv[0], argv, env)


def _check_promoted(config, alias: str) -> None:
    """One line, and nothing created, when there is nothing to serve: no local store yet, or no version holds
    the alias."""
    nothing = f"nothing is promoted as {config.experiment}@{alias} yet: run `soups run` (or `soups promote`) first"
    from tasks.adapters.relocation import own_database

    database = own_database(config.tracking)
    if database is not None and not database.is_file():
        raise UsageError(f"{nothing}; no MLflow store in {config.tracking.root}")
    from mlflow.exceptions import MlflowException

    from tasks.adapters.tracking import client_for, ensure_experiment

    ensure_experiment(config)  # opens the store where it is now (a moved root's locations follow it)
    try:
        client_for(config.tracking).get_model_version_by_alias(config.experiment, alias)
    except MlflowException:
        raise UsageError(nothing) from None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("model-soups")
    except PackageNotFoundError:  # a checkout on the path without `make`
        return "unknown (not installed: run make)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="soups", description="Model soups: average fine-tuned weights.")
    parser.add_argument("--version", action="version", version=f"soups {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    cook = commands.add_parser("cook", help="cook a soup from safetensors checkpoints (no server needed)")
    cook.add_argument(
        "recipe", help="uniform, task_arithmetic, ties, dare, model_stock, slerp, wise_ft, ... (see README)"
    )
    cook.add_argument("inputs", nargs="+", help="ingredient checkpoints (.safetensors)")
    cook.add_argument("--out", required=True, help="where to write the soup (.safetensors)")
    cook.add_argument("--base", help="the zero-shot start the ingredients were fine-tuned from (task vectors)")
    cook.add_argument(
        "--param", action="append", metavar="NAME=VALUE", help="a recipe option, e.g. --param density=0.2 (repeatable)"
    )
    cook.add_argument("--dtype", help="dtype of the written uniform soup (default: the ingredients' own)")
    cook.set_defaults(handler=cook_command)

    stages = {
        "run": "the whole pipeline: pretrain (if configured) -> sweep -> kitchen -> promotion",
        "sweep": "add sweep.n_trials fine-tuning trials to the Optuna study (resumes it if it exists)",
        "kitchen": "cook every configured recipe from the study's registered ingredients and promote the best",
        "promote": "re-score the study's registered soups and promote the best",
        "pretrain": "make the offline pretrained start (contrastive pretraining on the pretrain split)",
        "reap": "close what killed sweeps left RUNNING (Optuna trials, MLflow runs, Prefect flow runs) now",
    }
    for name, text in stages.items():
        stage = commands.add_parser(name, help=text, description=text)
        stage.add_argument("config", nargs="?", help="YAML config file (default: the embedded offline defaults)")
        stage.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="override one setting, e.g. --set sweep.n_trials=4 (repeatable)",
        )
        stage.set_defaults(handler=pretrain_command if name == "pretrain" else stage_command)
    serve = commands.add_parser("serve", help="serve the promoted model over HTTP (mlflow models serve, CPU or GPU)")
    serve.add_argument("config", nargs="?", help="YAML config file (default: the embedded offline defaults)")
    serve.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one setting (repeatable)")
    serve.add_argument("--alias", default="champion", help="registry alias to serve (default champion)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=5001, help="port (default 5001)")
    serve.set_defaults(handler=serve_command)
    add_import_parser(commands)
    add_stack_parser(commands)
    add_config_parsers(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], None] = args.handler
    try:
        handler(args)
    except UsageError as err:
        print(f"soups {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, RuntimeError, ImportError, pickle.UnpicklingError) as err:
        # Domain errors (bad data, incompatible or missing checkpoints, nothing registered yet, a diverged
        # run, an unusable store) already say what is wrong and what to do; a traceback would only bury that.
        if os.environ.get("SOUPS_DEBUG"):
            raise
        print(f"soups {args.command}: error: {_one_line(err)} (SOUPS_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    return 0


def _one_line(err: BaseException) -> str:
    """The error as one line; errors raised deep in libraries get what to do instead of their own advice."""
    text = " ".join(str(err).split())
    if isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in text:
        return unsafe_checkpoint("(model.pretrained or an ingredient)", err)
    if isinstance(err, ImportError) and err.name:
        return f"{type(err).__name__}: {text}; install the {err.name} package"
    return f"{type(err).__name__}: {text}"


if __name__ == "__main__":  # run as `python -m cli.main`: use the module's own classes, not __main__'s copies
    from cli.main import main as _main

    sys.exit(_main())
