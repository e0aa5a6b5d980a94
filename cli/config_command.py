"""``soups config`` and ``soups recipes``: what a run would use, and what the kitchen can cook, printed from the
configuration's and the recipes' own declarations (nothing here restates a default or an option)."""

from __future__ import annotations

import argparse
import json

from cli.common import config_from


def config_command(args: argparse.Namespace) -> None:
    """The effective configuration (defaults, then the file, then ``--set``) as YAML, or its JSON schema. A
    config never holds a password: loading refuses one in a URL and names the variable to export instead."""
    if args.schema:
        from soups.config import PipelineConfig

        print(json.dumps(PipelineConfig.model_json_schema(by_alias=True), indent=2))
        return
    import yaml

    config = config_from(args)
    print(yaml.safe_dump(config.model_dump(mode="json", by_alias=True), sort_keys=False), end="")


def recipes_command(args: argparse.Namespace) -> None:
    """Every registered recipe: its summary, what it needs beyond files, and each option with its default."""
    from soups.recipes import RECIPES

    for name, recipe in RECIPES.items():
        needs = f" (needs {', '.join(recipe.needs)})" if recipe.needs else ""
        print(f"{name}: {recipe.summary}{needs}")
        for field_name, field in recipe.options.model_fields.items():
            default = field.get_default(call_default_factory=True)
            print(f"    {field.alias or field_name} = {json.dumps(default)}: {field.description}")


def add_config_parsers(commands) -> None:
    show = commands.add_parser(
        "config", help="print the effective configuration as YAML (or --schema: its JSON schema)"
    )
    show.add_argument("config", nargs="?", help="YAML config file (default: the embedded offline defaults)")
    show.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one setting (repeatable)")
    show.add_argument("--schema", action="store_true", help="print the configuration's JSON schema instead")
    show.set_defaults(handler=config_command)
    recipes = commands.add_parser("recipes", help="list every recipe with its options, defaults and summary")
    recipes.set_defaults(handler=recipes_command)
