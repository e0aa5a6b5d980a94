"""What every command shares: the one-line error type and the validated config from the command line."""

from __future__ import annotations

import argparse
from pathlib import Path


class UsageError(Exception):
    """A problem the user can fix; printed as one line without a traceback."""


def config_from(args: argparse.Namespace):
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
