"""``soups import``: register checkpoints fine-tuned elsewhere (the paper's released ViT-B/32 fine-tunes, or
open_clip classifiers) as ingredients of an experiment, so ``soups kitchen`` cooks them with its own.

Like every command, it imports torch and MLflow only when it runs, so ``soups --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

# Kept here rather than imported from soups.importing, which loads torch; that module checks them again.
_FORMATS = ("auto", "open_clip", "model-soups")


def add_import_parser(subparsers: Any) -> argparse.ArgumentParser:
    """The ``import`` sub-command on the ``soups`` parser's sub-parsers."""
    text = "register existing checkpoints as ingredients of an experiment, for `soups kitchen`"
    parser = subparsers.add_parser("import", help=text, description=text)
    parser.add_argument(
        "files", nargs="+", metavar="FILE", help="checkpoints: .safetensors, or .pt state dicts (weights only)"
    )
    parser.add_argument(
        "--experiment",
        required=True,
        metavar="NAME",
        help="experiment whose NAME-ingredients receive them; cook them with --set experiment=NAME",
    )
    parser.add_argument(
        "--model",
        required=True,
        metavar="ARCH",
        help="open_clip architecture they were fine-tuned from (the paper's: ViT-B-32-quickgelu)",
    )
    parser.add_argument(
        "--format",
        default="auto",
        choices=_FORMATS,
        help="open_clip: visual.* + head.* (this project's); model-soups: the paper's released layout "
        "(model.visual.* + classification_head.*); auto: tell from the keys (default)",
    )
    parser.add_argument("--config", help="YAML config (default: the embedded defaults); --experiment/--model win")
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set tracking.root=DIR (repeatable)",
    )
    parser.set_defaults(handler=import_command)
    return parser


def import_command(args: argparse.Namespace) -> None:
    # Imported here, not at the top: cli.main imports this module to register the command.
    from cli.common import UsageError, config_from

    names = [f"experiment={json.dumps(args.experiment)}", f"model.name={json.dumps(args.model)}"]
    config = config_from(argparse.Namespace(config=args.config, set=[*(args.set or []), *names]))
    from tasks.adapters.tracking import ingredients_model_name
    from tasks.importing import import_checkpoints

    try:
        versions = import_checkpoints(config, [Path(f) for f in args.files], args.format)
    except (ValueError, FileNotFoundError) as err:  # CheckpointError is a ValueError
        raise UsageError(str(err)) from err
    print(f"{len(args.files)} file(s) are versions {', '.join(versions)} of {ingredients_model_name(config)}")
    print(
        f"cook them: soups kitchen CONFIG --set experiment={config.experiment} --set model.name={config.model.name} "
        "(CONFIG names their dataset and, as model.pretrained, the zero-shot start they were fine-tuned from)"
    )
