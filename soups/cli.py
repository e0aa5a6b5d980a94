"""The ``soups`` command line. Heavy packages are imported inside the commands that use them, so
``soups --help`` and ``soups cook`` start in a second or so and never load Prefect or MLflow."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


class UsageError(Exception):
    """A problem the user can fix; printed as one line without a traceback."""


def cook_command(args: argparse.Namespace) -> None:
    from soups.checkpoint import CheckpointError, Ingredient, save_state_dict, torch_dtype
    from soups.recipes import cook

    out = Path(args.out)
    if out.resolve() in {Path(p).resolve() for p in args.inputs}:
        raise UsageError(f"--out {out} is also an input; write the soup to a new file")
    try:
        dtype = torch_dtype(args.dtype) if args.dtype else None
        ingredients = [Ingredient(Path(p)) for p in args.inputs]
        (dish,) = cook("uniform", ingredients, dtype=dtype)
    except (CheckpointError, ValueError) as err:
        raise UsageError(str(err)) from err
    metadata = {"recipe": "uniform", "ingredients": ",".join(str(i.path) for i in ingredients)}
    save_state_dict(dish.state_dict, out, metadata)
    print(f"uniform soup of {len(ingredients)} ingredients written to {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="soups", description="Model soups: average fine-tuned weights.")
    commands = parser.add_subparsers(dest="command", required=True)

    cook = commands.add_parser("cook", help="cook a soup from safetensors checkpoints (no server needed)")
    cook.add_argument("recipe", choices=["uniform"], help="recipe to cook")
    cook.add_argument("inputs", nargs="+", help="ingredient checkpoints (.safetensors)")
    cook.add_argument("--out", required=True, help="where to write the soup (.safetensors)")
    cook.add_argument("--dtype", help="dtype of the written soup (default: the ingredients' own)")
    cook.set_defaults(handler=cook_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], None] = args.handler
    try:
        handler(args)
    except UsageError as err:
        print(f"soups {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
