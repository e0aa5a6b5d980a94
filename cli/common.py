"""What every command shares: the one-line error type and the validated config from the command line."""

from __future__ import annotations

import argparse
from pathlib import Path


class UsageError(Exception):
    """A problem the user can fix; printed as one line without a traceback."""


def config_from(args: argparse.Namespace):
    """The one validated config: YAML file (or embedded defaults) plus ``--set key=value`` overrides."""
    from soups.config import ConfigError, load_config

    overrides = assignments(args.set, "--set", "sweep.n_trials=4")
    try:
        return load_config(Path(args.config) if args.config else None, overrides)
    except ConfigError as err:
        raise UsageError(str(err)) from err


def assignments(items: list[str] | None, flag: str, example: str) -> dict[str, object]:
    """``NAME=VALUE`` arguments as a dict, each value read as YAML (numbers, lists, null)."""
    import yaml

    parsed = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"{flag} expects NAME=VALUE (e.g. {flag} {example}), got {item!r}")
        parsed[name] = yaml.safe_load(value)
    return parsed
