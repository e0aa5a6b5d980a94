"""The ``soups`` command line. Heavy packages are imported inside the commands that use them, so
``soups --help`` and ``soups cook`` start in a second or so and never load Prefect or MLflow."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from cli.import_command import add_import_parser
from cli.stack_command import add_stack_parser


class UsageError(Exception):
    """A problem the user can fix; printed as one line without a traceback."""


def cook_command(args: argparse.Namespace) -> None:
    """Any recipe that needs only files (and ``--base`` for the ones built on the zero-shot start)."""
    import yaml

    from soups.checkpoint import CheckpointError, Ingredient, save_state_dict
    from soups.recipes import RecipeInputs, cook, get_recipe

    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; give a file name such as {out / 'soup.safetensors'}")
    if out.resolve() in {Path(p).resolve() for p in args.inputs}:
        raise UsageError(f"--out {out} is also an input; write the soup to a new file")
    options = {}
    for item in args.param or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--param expects NAME=VALUE (e.g. --param density=0.2), got {item!r}")
        options[name] = yaml.safe_load(value)
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


def _config_from(args: argparse.Namespace):
    """The one validated config: YAML file (or embedded defaults) plus ``--set key=value`` overrides."""
    import yaml

    from soups.config import ConfigError, load_config

    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set expects key=value (e.g. sweep.n_trials=4), got {item!r}")
        overrides[key] = yaml.safe_load(value)
    try:
        return load_config(Path(args.config) if args.config else None, overrides)
    except ConfigError as err:
        raise UsageError(str(err)) from err


def _prepare_environment(root: Path) -> None:
    """Keep Prefect's local database beside the MLflow and Optuna data (unless the user chose a home or a
    server), so the UIs printed at the end show this run; quiet MLflow's download progress bars."""
    if "PREFECT_HOME" not in os.environ:
        home = (root / "prefect").resolve()
        home.mkdir(parents=True, exist_ok=True)
        os.environ["PREFECT_HOME"] = str(home)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # A fresh Prefect home migrates its database on first start, which takes longer than the 20 s default.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    # The temporary server's telemetry writes race the flow for the SQLite lock ("database is locked").
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def pretrain_command(args: argparse.Namespace) -> None:
    config = _config_from(args)
    from soups.pretrain import needs_offline_start

    if not needs_offline_start(config):
        raise UsageError("this config fine-tunes from model.pretrained; set it to null and keep a pretrain section")
    from soups.data import load_dataset
    from soups.pretrain import pretrain, start_path
    from soups.runtime import resolve_device

    device = resolve_device(config.train.device)
    result = pretrain(config.pretrain, config.model.name, load_dataset(config.data), start_path(config), device)
    print(f"zero-shot held-out accuracy {result.zero_shot_accuracy:.3f} after {result.seconds:.1f}s")
    print(f"pretrained checkpoint: {result.checkpoint}")


def _check_pretrained(pretrained: str | None) -> None:
    """A pretrained start that is a file must hold tensors only: fail here, in one line, before a server starts
    (torch's own error for a pickled file even suggests loading it unsafely)."""
    if not pretrained or pretrained.startswith("local-dir:"):
        return
    path = Path(pretrained).expanduser()
    if not path.is_file():
        return  # an open_clip tag, or a missing file: the flow says which
    from soups.checkpoint import CheckpointError, read_header

    if path.suffix == ".safetensors":
        try:
            read_header(path)
        except CheckpointError as err:
            raise UsageError(f"model.pretrained: {err}") from None
        return
    import pickle
    import zipfile

    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise UsageError(_unsafe_checkpoint(path, err)) from None


def _unsafe_checkpoint(path, err: BaseException) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "weights_only" in first or "Weights only load failed" in first:
        first = "it holds pickled Python objects, not only tensors"
    return (
        f"model.pretrained {path} cannot be loaded as plain tensors ({first}); such files are never unpickled "
        "here: convert it to safetensors where you trust it (safetensors.torch.save_file(state_dict, "
        "'start.safetensors')) and point model.pretrained at that file"
    )


def _check_stores(config, command: str) -> None:
    """The MLflow store (server reachable, database of this MLflow) and, for stages that sweep, the Optuna
    storage (its driver installed) are checked, and created, before a Prefect server starts."""
    from tasks.adapters.tracking import check_reachable, ensure_experiment

    check_reachable(config.tracking)
    if command in ("run", "sweep"):
        from tasks.adapters.studies import open_study

        open_study(config)
    ensure_experiment(config)


# Arms the parent-death signal (PR_SET_PDEATHSIG = 1), checks the parent still lives, then becomes the command:
# a small exec trampoline, since a preexec_fn is unsafe once a process has threads.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
    "os.getppid() == int(sys.argv[1]) or sys.exit(1); os.execvp(sys.argv[2], sys.argv[2:])"
)


@contextmanager
def _children_die_with_us() -> Iterator[None]:
    """Processes started meanwhile get the kernel's parent-death signal (Linux; elsewhere nothing changes)."""
    if not sys.platform.startswith("linux"):
        yield
        return
    import subprocess

    popen = subprocess.Popen
    parent = str(os.getpid())

    def dying_with_us(args, *rest, **kwargs):
        return popen([sys.executable, "-c", _DIE_WITH_PARENT, parent, *args], *rest, **kwargs)

    subprocess.Popen = dying_with_us
    try:
        yield
    finally:
        subprocess.Popen = popen


def _start_temporary_server(tracking) -> None:
    """Prefect's temporary server (when PREFECT_API_URL names none) is a uvicorn child process that outlives
    a SIGKILLed parent, and migrates its database on a fresh PREFECT_HOME. Start it here: with the
    parent-death signal set, so a killed `soups` leaves no server behind, and under the data root's lock, so
    commands started together never migrate the same fresh database at once. Prefect's client then reuses it
    (the one `SubprocessASGIServer` keyed by port None)."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    from tasks.adapters.tracking import stores_lock

    with stores_lock(tracking), _children_die_with_us():
        SubprocessASGIServer().start()


class _TracebackToDebug:
    """On the console, Prefect's error logs keep their message line; the traceback goes to debug level
    (PREFECT_LOGGING_LEVEL=DEBUG, or SOUPS_DEBUG=1, shows it). The Prefect UI keeps the full record."""

    def filter(self, record) -> bool:
        import logging

        if record.exc_info and record.levelno > logging.DEBUG:
            logging.getLogger("prefect.soups.traceback").debug(
                "traceback of: %s", record.getMessage(), exc_info=record.exc_info
            )
            record.exc_info = None
            record.exc_text = None
        return True


def _quiet_tracebacks() -> None:
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    if os.environ.get("SOUPS_DEBUG"):
        return
    import prefect.main  # noqa: F401 - configures Prefect's logging (its console handler) once

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not any(
            isinstance(f, _TracebackToDebug) for f in handler.filters
        ):
            handler.addFilter(_TracebackToDebug())


def stage_command(args: argparse.Namespace) -> None:
    """``soups run|sweep|kitchen|promote``: one stage (or all) as a Prefect flow run."""
    config = _config_from(args)
    if args.command != "run":  # fail before a Prefect server starts; `run` pretrains when it must
        from soups.pretrain import with_resolved_start

        config = with_resolved_start(config, missing_ok=args.command != "sweep")
    _check_pretrained(config.model.pretrained)
    _prepare_environment(config.tracking.root)
    _check_stores(config, args.command)
    _quiet_tracebacks()
    _start_temporary_server(config.tracking)
    started = time.perf_counter()
    if args.command == "run":
        from flows.pipeline import pipeline_flow

        result = pipeline_flow(config)
        _print_summary(config, result["kitchen"], time.perf_counter() - started)
    elif args.command == "sweep":
        from flows.sweep import sweep_flow

        result = sweep_flow(config)
        print(f"{len(result['finished'])} trials finished, {len(result['failed'])} failed or pruned")
    elif args.command == "kitchen":
        from flows.kitchen import kitchen_flow

        _print_summary(config, kitchen_flow(config), time.perf_counter() - started)
    else:
        from flows.promote import promote_flow

        print(promote_flow(config)["outcome"])


def _print_summary(config, kitchen: dict, seconds: float) -> None:
    import pandas as pd

    from soups.report import format_leaderboard

    board = pd.DataFrame(kitchen["leaderboard"])
    print("\nLeaderboard (accuracy [95 % interval]; held-out picks, test and shifts only report):")
    print(format_leaderboard(board))
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
    print(f"  Optuna dashboard: pip install optuna-dashboard && optuna-dashboard {tracking.resolved_optuna_storage()}")
    print(f"  Prefect UI:       PREFECT_HOME={os.environ['PREFECT_HOME']} prefect server start")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="soups", description="Model soups: average fine-tuned weights.")
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
    add_import_parser(commands)
    add_stack_parser(commands)
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
        return _unsafe_checkpoint("(model.pretrained or an ingredient)", err)
    if isinstance(err, ImportError) and err.name:
        return f"{type(err).__name__}: {text}; install the {err.name} package"
    return f"{type(err).__name__}: {text}"


if __name__ == "__main__":  # run as `python -m cli.main`: use the module's own classes, not __main__'s copies
    from cli.main import main as _main

    sys.exit(_main())
