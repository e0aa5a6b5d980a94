"""``soups stack up|status|down --root DIR``: the shared backends of a multi-machine setup (PostgreSQL, an
``mlflow server`` serving artifacts, a Prefect server, a process work pool and its workers) on this machine.

The work lives in ``deployments/stack.py``, imported inside the handlers so ``soups --help`` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_stack_parser(subparsers: Any) -> argparse.ArgumentParser:
    """The ``stack`` sub-command (and its ``up``, ``status``, ``down`` actions) on the ``soups`` parser."""
    text = "start, report or stop the shared backends: PostgreSQL, mlflow server, Prefect server and workers"
    parser = subparsers.add_parser("stack", help=text, description=text)
    actions = parser.add_subparsers(dest="action", required=True)

    up = actions.add_parser("up", help="start the stack; writes DIR/stack.yaml (a config) and DIR/stack.env")
    up.add_argument("--workers", type=int, default=1, help="Prefect workers to start on this machine (default 1)")
    up.add_argument("--pool", default="soups", help="the process work pool the workers serve (default soups)")
    up.add_argument(
        "--host",
        default="127.0.0.1",
        help="IP address every service listens on and is reached at (default 127.0.0.1; another machine's "
        "workers need this machine's address on their network)",
    )
    up.add_argument(
        "--auth",
        action="store_true",
        help="MLflow and the Prefect API ask for a password (always on when --host is not a loopback address); "
        "clients get it from DIR/stack.env",
    )
    for service in ("postgres", "mlflow", "prefect"):
        up.add_argument(f"--{service}-port", type=int, default=0, metavar="PORT", help="default: a free port")
    up.add_argument("--timeout", type=float, default=180.0, help="seconds each service may take to answer")
    up.set_defaults(handler=stack_up_command)

    status = actions.add_parser("status", help="each process of the stack: running or dead, and its address")
    status.set_defaults(handler=stack_status_command)
    down = actions.add_parser("down", help="stop every process the stack started; the data stays in DIR")
    down.set_defaults(handler=stack_down_command)
    for action in (up, status, down):
        action.add_argument("--root", required=True, type=Path, metavar="DIR", help="the stack's folder")
    return parser


def stack_up_command(args: argparse.Namespace) -> None:
    # Imported here, not at the top: cli.main imports this module to register the command.
    from cli.common import UsageError
    from deployments.stack import ENV_FILE, OVERLAY, StackError, StackOptions, up

    options = StackOptions(
        root=args.root,
        host=args.host,
        workers=args.workers,
        pool=args.pool,
        postgres_port=args.postgres_port,
        mlflow_port=args.mlflow_port,
        prefect_port=args.prefect_port,
        timeout=args.timeout,
        auth=args.auth,
    )
    try:
        stack = up(options)
    except StackError as err:
        raise UsageError(str(err)) from err
    for service in stack.services:
        print(f"  {service.name:<16} {service.address:<32} log {service.log}")
    env_file, overlay = stack.root / ENV_FILE, stack.root / OVERLAY
    if stack.generated_password:
        print(f"A database password was generated into {env_file} (mode 0600).")
    if stack.auth:
        print(f"Authentication is on: MLflow user soups and Prefect's auth string are in {env_file}.")
    print(f"\nUse it:            . {env_file} && soups run {overlay}")
    print(f"  MLflow UI:        {stack.mlflow_uri}")
    print(f"  Prefect UI:       {stack.prefect_api.removesuffix('/api')}")
    dashboard = f"optuna-dashboard {stack.optuna_storage}"
    print(f"  Optuna dashboard: pip install -c requirements.lock -e '.[ui]' && . {env_file} && {dashboard}")
    print(f"Stop it:           soups stack down --root {stack.root}")


def stack_status_command(args: argparse.Namespace) -> None:
    from cli.common import UsageError
    from deployments.stack import status

    processes = status(args.root)
    if not processes:
        raise UsageError(f"no stack at {args.root} (no stack.json); start one with `soups stack up --root DIR`")
    for service, running in processes:
        print(f"  {service.name:<16} {'running' if running else 'dead':<8} {service.address:<32} pid {service.pid}")
    dead = [service for service, running in processes if not running]
    if dead:
        raise UsageError(
            f"{len(dead)} of {len(processes)} processes are dead ({', '.join(s.name for s in dead)}; see "
            f"{dead[0].log}); `soups stack down --root {args.root}` then `up` restarts the stack"
        )


def stack_down_command(args: argparse.Namespace) -> None:
    from cli.common import UsageError
    from deployments.stack import StackError, down

    try:
        stopped = down(args.root)
    except StackError as err:
        raise UsageError(str(err)) from err
    if stopped:
        print(f"stopped {', '.join(service.name for service in stopped)}; the data stays in {args.root}")
    else:
        print(f"no stack running at {args.root}; nothing to stop")
