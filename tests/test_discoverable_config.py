"""A configuration people can discover: `soups config` prints the effective one as YAML that loads back to
the same config, `--schema` its JSON schema with every field described, `soups recipes` every recipe with its
options and defaults from the recipes' own declarations, and byte sizes accept units."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from soups.config import ConfigError, PipelineConfig, load_config
from soups.recipes import RECIPES

SOUPS = str(Path(sys.executable).with_name("soups"))


def _soups(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([SOUPS, *argv], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_soups_config_prints_defaults_file_and_overrides_as_yaml_that_loads_back_the_same(tmp_path):
    config_file = tmp_path / "mine.yaml"
    config_file.write_text("experiment: mine\nsweep: {n_trials: 7}\n")
    done = _soups("config", str(config_file), "--set", "train.cache_bytes=16GiB", "--set", "sweep.seed=3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    printed = yaml.safe_load(done.stdout)
    assert printed["experiment"] == "mine" and printed["sweep"]["n_trials"] == 7 and printed["sweep"]["seed"] == 3
    assert printed["train"]["cache_bytes"] == 16 * 2**30
    assert printed["kitchen"]["recipes"], "the defaults are there too"
    (tmp_path / "printed.yaml").write_text(done.stdout)
    expected = load_config(config_file, {"train.cache_bytes": "16GiB", "sweep.seed": 3})
    assert printed == expected.model_dump(mode="json", by_alias=True)
    assert load_config(tmp_path / "printed.yaml").model_dump(mode="json", by_alias=True) == printed  # runs as is


def test_soups_config_of_a_bad_file_is_one_line_naming_the_field(tmp_path):
    (tmp_path / "bad.yaml").write_text("sweep: {n_trials: 0}\n")
    done = _soups("config", str(tmp_path / "bad.yaml"), cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == "" and "sweep.n_trials" in done.stderr


def test_the_schema_is_json_and_every_field_of_every_section_has_a_description(tmp_path):
    done = _soups("config", "--schema", cwd=tmp_path)
    assert done.returncode == 0
    schema = json.loads(done.stdout)
    assert schema == PipelineConfig.model_json_schema(by_alias=True)
    sections = [("PipelineConfig", schema), *schema["$defs"].items()]
    undescribed = [
        f"{name}.{field}"
        for name, section in sections
        for field, spec in section.get("properties", {}).items()
        if not spec.get("description")
    ]
    assert not undescribed, undescribed
    assert len(sections) > 10


def test_soups_recipes_lists_every_recipe_with_each_option_its_default_and_summary(tmp_path):
    done = _soups("recipes", cwd=tmp_path)
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    heads = {line.split(":")[0]: line for line in lines if not line.startswith(" ")}
    assert set(heads) == set(RECIPES)
    for name, recipe in RECIPES.items():
        assert recipe.summary and recipe.summary in heads[name]
        for field_name, field in recipe.options.model_fields.items():
            default = json.dumps(field.get_default(call_default_factory=True))
            assert f"    {field.alias or field_name} = {default}: {field.description}" in lines, (name, field_name)
    assert "    density = 0.2: " in done.stdout  # ties' own default, as it declares it


@pytest.mark.parametrize(
    ("given", "expected"),
    [("16GiB", 16 * 2**30), ("512MB", 512 * 10**6), ("1024", 1024), (2048, 2048), ("1.5 KiB", 1536)],
)
def test_byte_sizes_take_units(given, expected):
    config = load_config(None, {"train.cache_bytes": given, "eval.cache_bytes": given})
    assert config.train.cache_bytes == expected and config.eval.cache_bytes == expected


def test_a_byte_size_in_an_unknown_unit_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match="train.cache_bytes"):
        load_config(None, {"train.cache_bytes": "16 gigs"})
