"""Random configs at the validator and random bytes at the checkpoint reader: only the platform's own errors come out.

Every input here is something a user can hand the platform by mistake (a mangled YAML file, a half-copied or
corrupted checkpoint). The platform promises either a result or its own error type (``ConfigError``,
``CheckpointError``) whose message the command line prints without a traceback; a library's exception escaping
(``yaml``, ``pydantic``, ``json``, ``struct``, ``safetensors``, ``TypeError``, ``KeyError``...) is a bug.

Each test writes its files into a ``tempfile`` folder of its own, and hypothesis keeps no example database and
its caches in a temporary folder, so nothing lands in the repository or the home folder. A failure prints the
smallest input that triggers it.
"""

from __future__ import annotations

import json
import struct
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from soups.checkpoint import (
    SAFETENSORS_DTYPES,
    CheckpointError,
    check_compatible,
    iter_tensors,
    load_state_dict,
    read_header,
    save_state_dict,
    weights_digest,
)
from soups.config import (
    ConfigError,
    DataConfig,
    Distribution,
    EvalConfig,
    KitchenConfig,
    ModelConfig,
    PipelineConfig,
    PretrainConfig,
    RecipeChoice,
    SweepConfig,
    TrackingConfig,
    TrainConfig,
    load_config,
)
from soups.recipes import RECIPES

# Hypothesis caches Unicode tables and source constants in ./.hypothesis even without an example database;
# keep them in a temporary folder so a test run writes nothing into the checkout.
set_hypothesis_home_dir(tempfile.mkdtemp(prefix="soups-tests-hypothesis-"))

# Conservative: the whole file stays well under a minute on two shared cores.
FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)


@contextmanager
def _folder():
    with tempfile.TemporaryDirectory(prefix="soups-fuzz-") as folder:
        yield Path(folder)


# ------------------------------------------------------------------------------------------------ configs

_MODELS = [PipelineConfig, ModelConfig, DataConfig, DataConfig.Heldout, TrainConfig, Distribution, SweepConfig]
_MODELS += [KitchenConfig, RecipeChoice, EvalConfig, TrackingConfig, PretrainConfig]
_NAMES = sorted({"from", *(name for model in _MODELS for name in model.model_fields)})
_WORDS = [
    *("tpe", "random", "qmc", "local", "deployment", "trial/trial", "val", "train", "digits", "imagefolder", "csv"),
    *("error", "skip", "heldout", "ood_val_mean", "loguniform", "uniform", "int", "categorical", "index", "auto"),
    *("greedy", "learned", "learned_by_layer", "ensemble", "wise_ft", "ties", "task_arithmetic", "best", "rotate"),
    *("imagenet", "default", "openai_imagenet", "simple", "cpu", "cuda:0", "", " ", "a\nb", "../..", "/dev/null"),
]

_keys = st.sampled_from(_NAMES) | st.text(max_size=10)
_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-3, max_value=40)
    | st.floats()  # nan, inf, -0.0, subnormals
    | st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308, 5e-324, 0.5, 1.0, 0.0])
    | st.text(max_size=20)
    | st.sampled_from(_WORDS)
)
_values = st.recursive(
    _leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_keys, children, max_size=4),
    max_leaves=20,
)
_sections = st.dictionaries(st.sampled_from(list(PipelineConfig.model_fields)) | _keys, _values, max_size=6)

# Pieces of YAML syntax, so random text often gets past the first character and into the parser's corners.
_YAML_PIECES = [
    *("sweep:", "train:", "space:", "kitchen:", "data:", "model:", "tracking:", "\n", "  ", "    ", "- ", ": "),
    *("{", "}", "[", "]", ",", "'", '"', "#", "? ", "|", ">", "---", "...", "%YAML 1.1\n", "%TAG ! !x\n", "&a ", "*a"),
    *("!!int ", "!!float ", "!!binary ", "!!timestamp ", "!!set ", "!!omap ", "!!python/name:os.system ", "!x "),
    *("2001-02-30", "2001-13-01", "2001-12-14t21:59:43.10-25:00", "1_000", "0x1F", "0o17", "1e400", ".nan", "-.inf"),
    *("~", "null", "yes", "on", "<<: ", "<<: *a", "\t", "\x00", "\ufeff", "\x85", "\u2028", "\\", "n_trials", "lr"),
]
_yaml_like_text = st.lists(st.sampled_from(_YAML_PIECES) | st.text(max_size=6), max_size=25).map("".join)
# Explicitly tagged scalars reach PyYAML's constructors, which raise more than YAMLError on odd values.
_TAGS = ["!!int", "!!float", "!!bool", "!!timestamp", "!!binary", "!!str", "!!null", "!!set", "!!omap", "!!pairs"]
_SCALARS = ["maybe", "x", "0x", "0b", "0o", "2001-02-30", "2001-13-01", "1e999", "", "abc", ".nan", "[1]", "{a: 1}"]
_tagged_text = st.builds(
    "sweep:\n  {}: {} {}\n".format,
    st.sampled_from(_NAMES),
    st.sampled_from(_TAGS),
    st.sampled_from(_SCALARS) | st.text(max_size=8),
)
_dotted = st.lists(st.sampled_from(_NAMES) | st.text(alphabet="abcz_.0", max_size=4), min_size=1, max_size=3).map(
    ".".join
)
_overrides = st.none() | st.dictionaries(_dotted, _values, max_size=3)


def _assert_platform_message(message: str) -> None:
    """What ``soups`` prints after ``error:``: one line, or for field errors a headline and one line per field."""
    assert message.strip(), "an error must say what is wrong"
    first, *problems = message.splitlines()
    if not problems:
        return
    assert first.startswith("invalid config") and first.endswith(":"), f"multi-line error {message!r}"
    for line in problems:
        assert line.startswith("  ") and ": " in line, f"field problem not on one line of its own: {message!r}"


def _load_gives_config_or_config_error(path: Path | None, overrides: dict | None = None) -> None:
    try:
        config = load_config(path, overrides)
    except ConfigError as err:
        _assert_platform_message(str(err))
    else:
        assert isinstance(config, PipelineConfig)


def _write_yaml(folder: Path, data: Any) -> Path:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


@FUZZ
@given(data=_sections | _values, overrides=_overrides)
@example(data={"\n": None}, overrides=None)  # a key holding a newline broke the one-line-per-field message
@example(data={"sweep": 5}, overrides={"sweep.n_trials": 3})  # was a TypeError: 'int' has no item assignment
@example(data={"pretrain": None}, overrides={"pretrain.epochs": 3})  # was AttributeError on None.setdefault
def test_random_config_structures_give_a_config_or_a_config_error(data, overrides):
    """Sections and fields of any type (nan, huge ints, lists for mappings, nesting) plus ``--set``-style
    overrides into any path: validation names what is wrong instead of crashing inside a validator."""
    with _folder() as folder:
        _load_gives_config_or_config_error(_write_yaml(folder, data), overrides)


@FUZZ
@given(text=_yaml_like_text | _tagged_text | st.text(max_size=200))
@example(text="experiment: 2001-02-30\n")  # PyYAML: ValueError (day is out of range for month)
@example(text="sweep:\n  pruning: !!bool maybe\n")  # PyYAML: KeyError
@example(text="sweep:\n  seed: !!timestamp x\n")  # PyYAML: AttributeError
@example(text="[" * 3000)  # PyYAML: RecursionError
@example(text='experiment: "x\n')  # a YAMLError whose message spans five lines
def test_random_text_as_config_file_gives_a_config_or_a_config_error(text):
    """Broken YAML (bad indentation, tags, anchors, impossible dates, control characters) is a ConfigError."""
    with _folder() as folder:
        path = folder / "config.yaml"
        path.write_text(text, encoding="utf-8")
        _load_gives_config_or_config_error(path)


@FUZZ
@given(blob=st.binary(max_size=300) | st.sampled_from([b"\xff\xfe", b"\xfe\xffx", b"a: \xc3\x28", b"\x00" * 9]))
@example(blob=b"\x80\x81")  # was a UnicodeDecodeError from Path.read_text
def test_random_bytes_as_config_file_give_a_config_error(blob):
    """A binary or wrongly encoded file (a checkpoint passed by mistake) is a ConfigError, not a decode error."""
    with _folder() as folder:
        path = folder / "config.yaml"
        path.write_bytes(blob)
        _load_gives_config_or_config_error(path)


_numbers = (
    st.integers(min_value=-5, max_value=50)
    | st.floats()
    | st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e-6, 1e6, 2**63])
)
_distributions = st.fixed_dictionaries(
    {"kind": st.sampled_from(["loguniform", "uniform", "int", "categorical"]) | _leaves},
    optional={
        "low": _numbers | _leaves,
        "high": _numbers | _leaves,
        "choices": st.lists(_numbers | _leaves, max_size=4) | _values,
        "or_zero": st.booleans() | _leaves,
    },
)
_OPTION_NAMES = sorted({f.alias or n for recipe in RECIPES.values() for n, f in recipe.options.model_fields.items()})
_recipe_names = st.sampled_from(sorted(RECIPES))
_recipes = _recipe_names | st.fixed_dictionaries(
    {"name": _recipe_names | _leaves},
    optional={
        "label": st.sampled_from(["a", "b", "bad label", "-x", ""]) | _leaves,
        "options": st.dictionaries(st.sampled_from(_OPTION_NAMES) | _keys, _numbers | _values, max_size=3) | _values,
        "grid": st.dictionaries(st.sampled_from(_OPTION_NAMES), st.lists(_numbers | _leaves, max_size=3), max_size=2)
        | _values,
    },
)


@FUZZ
@given(
    space=st.dictionaries(
        st.sampled_from(list(TrainConfig.model_fields)) | _keys, _distributions | _values, max_size=4
    ),
    recipes=st.lists(_recipes, max_size=4),
    train=st.dictionaries(st.sampled_from(list(TrainConfig.model_fields)), _numbers | _leaves, max_size=3),
)
@example(space={"epochs": {"kind": "int", "low": float("inf"), "high": float("inf")}}, recipes=[], train={})
def test_random_search_spaces_and_recipes_give_a_config_or_a_config_error(space, recipes, train):
    """Where validation runs code of its own (the search space checked against training limits, recipe options
    and grids): search ranges that are infinite, NaN, reversed or of the wrong kind, recipes with unknown or
    ill-typed options. An infinite int bound used to escape as OverflowError."""
    data = {"space": space, "kitchen": {"recipes": recipes}, "train": train}
    with _folder() as folder:
        _load_gives_config_or_config_error(_write_yaml(folder, data))


_VALID = PipelineConfig().model_dump(mode="json", by_alias=True)


def _node_paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in the valid config (sections, lists, leaves) that a mutation may replace."""
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    paths = [prefix] if prefix else []
    for key, child in children:
        paths += _node_paths(child, (*prefix, key))
    return paths


_PATHS = _node_paths(_VALID)


def _replaced(tree: Any, path: tuple, value: Any) -> Any:
    copy = json.loads(json.dumps(tree))
    node = copy
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return copy


def test_the_default_config_survives_a_round_trip_through_yaml():
    """The mutation tests below start from this file, so it must load as it is. (Kitchen recipes are compared by
    key: greedy fills in its combine recipe's defaults when combine_options is given, even as {}.)"""
    with _folder() as folder:
        config = load_config(_write_yaml(folder, _VALID))
    default = PipelineConfig()
    assert config.model_dump(exclude={"kitchen"}) == default.model_dump(exclude={"kitchen"})
    assert [choice.key for choice in config.kitchen.recipes] == [choice.key for choice in default.kitchen.recipes]


@FUZZ
@given(path=st.sampled_from(_PATHS), value=_values)
def test_one_mutated_field_of_a_valid_config_gives_a_config_or_a_config_error(path, value):
    """A valid file with one field, list item or section replaced by anything: close to real typos."""
    with _folder() as folder:
        _load_gives_config_or_config_error(_write_yaml(folder, _replaced(_VALID, path, value)))


@FUZZ
@given(path=st.sampled_from([p for p in _PATHS if all(isinstance(k, str) for k in p)]), value=_values)
def test_one_overridden_field_of_the_defaults_gives_a_config_or_a_config_error(path, value):
    """The same mutations given as ``--set a.b=value`` on top of the embedded defaults."""
    _load_gives_config_or_config_error(None, {".".join(path): value})


# ------------------------------------------------------------------------------------------------ checkpoints

_READERS: dict[str, Callable[[Path], object]] = {
    "read_header": read_header,
    "load_state_dict": load_state_dict,
    "weights_digest": weights_digest,
    "iter_tensors": lambda path: list(iter_tensors(path)),
    "check_compatible": lambda path: check_compatible([path, path]),
}


def _readers_return_or_raise_checkpoint_error(path: Path) -> None:
    for name, reader in _READERS.items():
        try:
            reader(path)
        except CheckpointError as err:
            message = str(err)
            assert "\n" not in message, f"{name}: the error is not one line: {message!r}"
            assert str(path) in message, f"{name}: the error does not name the file: {message!r}"


def _safetensors(header: Any, payload: bytes = b"", declared: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if declared is None else declared) + raw + payload


_u64 = st.integers(min_value=0, max_value=2**64 - 1)
_ONE_FLOAT = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}


@FUZZ
@given(
    blob=st.binary(max_size=400)
    | st.builds(
        lambda length, rest: struct.pack("<Q", length) + rest, _u64 | st.integers(0, 64), st.binary(max_size=80)
    )
)
@example(blob=b"\xff" * 8 + b"{}")  # declares a 16 EiB header: refused before any read or allocation
def test_random_bytes_as_checkpoint_give_a_checkpoint_error(blob):
    """Any file (empty, shorter than the 8-byte length, a length beyond the file or beyond memory, garbage)."""
    with _folder() as folder:
        path = folder / "random.safetensors"
        path.write_bytes(blob)
        _readers_return_or_raise_checkpoint_error(path)


_json_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-2, max_value=64)
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(sorted(SAFETENSORS_DTYPES) + ["F8_E4M3", "U16", "U64", "C64", "f32", ""])
)
_json = st.recursive(
    _json_leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
_entry = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(sorted(SAFETENSORS_DTYPES) + ["F8_E4M3", "U16", "X"]) | _json,
        "shape": st.lists(st.integers(-2, 5) | st.integers(0, 2**70), max_size=4) | _json,
        "data_offsets": st.lists(st.integers(-4, 64) | _u64, min_size=2, max_size=2) | _json,
        "extra": _json,
    },
)
_headers = (
    st.dictionaries(st.text(max_size=6) | st.just("__metadata__"), _entry | _json, max_size=4)
    | _json
    | st.just(b"[" * 5000)  # raw bytes: nesting deeper than the JSON parser's recursion limit
)


@FUZZ
@given(
    header=_headers,
    payload=st.binary(max_size=128),
    declared=st.none() | st.none() | _u64 | st.integers(0, 300),
)
# Each of these escaped as a KeyError, TypeError, IndexError, AttributeError or RecursionError before.
@example(header={"w": {"shape": [1], "data_offsets": [0, 4]}}, payload=b"\0" * 4, declared=None)
@example(header={"w": {**_ONE_FLOAT, "dtype": ["F32"]}}, payload=b"", declared=None)
@example(header={"w": {**_ONE_FLOAT, "shape": 3}}, payload=b"", declared=None)
@example(header={"w": {**_ONE_FLOAT, "data_offsets": [0]}}, payload=b"", declared=None)
@example(header={"w": {**_ONE_FLOAT, "shape": [2**40, 2**40]}}, payload=b"", declared=None)
@example(header=[1], payload=b"", declared=None)
@example(header=b"[" * 5000, payload=b"", declared=None)
def test_near_valid_safetensors_headers_give_a_checkpoint_error(header, payload, declared):
    """A well-formed 8-byte length and JSON, but entries with missing fields, wrong types, negative or huge
    shapes, offsets past the file, unknown dtypes, non-object headers, deep nesting."""
    with _folder() as folder:
        path = folder / "near.safetensors"
        path.write_bytes(_safetensors(header, payload, declared))
        _readers_return_or_raise_checkpoint_error(path)


_DTYPE_SIZES = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in SAFETENSORS_DTYPES.items()}


@st.composite
def _consistent_headers(draw) -> tuple[dict, int]:
    """Headers whose offsets add up, so the readers get past the header and into the tensor bytes."""
    header, offset = {}, 0
    for key in draw(st.lists(st.text(min_size=1, max_size=5), max_size=4, unique=True)):
        dtype = draw(st.sampled_from(sorted(_DTYPE_SIZES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = _DTYPE_SIZES[dtype]
        for dim in shape:
            size *= dim
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2))
    return header, offset


@FUZZ
@given(layout=_consistent_headers(), data=st.data())
def test_consistent_headers_with_random_tensor_bytes_load_exactly_when_the_size_fits(layout, data):
    """Past the header the readers meet the tensor bytes: a right-sized payload loads whatever its bits (NaN
    patterns included; finiteness is the recipes' check), a payload too short or too long is a CheckpointError."""
    header, size = layout
    payload = data.draw(st.binary(min_size=size, max_size=size) | st.binary(max_size=size + 16), label="payload")
    with _folder() as folder:
        path = folder / "consistent.safetensors"
        path.write_bytes(_safetensors(header, payload))
        _readers_return_or_raise_checkpoint_error(path)
        if len(payload) == size:
            loaded = load_state_dict(path)
            tensors = {key: entry for key, entry in header.items() if key != "__metadata__"}
            assert {key: list(tensor.shape) for key, tensor in loaded.items()} == {
                key: entry["shape"] for key, entry in tensors.items()
            }
        else:
            with pytest.raises(CheckpointError):
                load_state_dict(path)


def _valid_checkpoint() -> bytes:
    state = {
        "layer.weight": torch.arange(30, dtype=torch.float32).view(6, 5),
        "layer.bias": torch.ones(6, dtype=torch.float16),
        "counter": torch.tensor([7], dtype=torch.int64),
        "mask": torch.tensor([True, False]),
    }
    with _folder() as folder:
        return save_state_dict(state, folder / "valid.safetensors", {"recipe": "uniform"}).read_bytes()


_VALID_CHECKPOINT = _valid_checkpoint()


@FUZZ
@given(
    flips=st.lists(st.tuples(st.integers(0, len(_VALID_CHECKPOINT) - 1), st.integers(1, 255)), max_size=6),
    cut=st.none() | st.integers(0, len(_VALID_CHECKPOINT)),
    tail=st.binary(max_size=16),
)
def test_a_damaged_valid_checkpoint_gives_its_tensors_or_a_checkpoint_error(flips, cut, tail):
    """A real checkpoint with flipped bytes (header or tensors), cut short, or with bytes appended."""
    blob = bytearray(_VALID_CHECKPOINT)
    for index, mask in flips:
        blob[index] ^= mask
    damaged = bytes(blob[:cut]) + tail
    with _folder() as folder:
        path = folder / "damaged.safetensors"
        path.write_bytes(damaged)
        _readers_return_or_raise_checkpoint_error(path)


def test_the_undamaged_checkpoint_reads_back():
    """The damaged-checkpoint test starts from this file, so it must read as it is."""
    with _folder() as folder:
        path = folder / "valid.safetensors"
        path.write_bytes(_VALID_CHECKPOINT)
        assert set(read_header(path)) == {"layer.weight", "layer.bias", "counter", "mask"}
        assert torch.equal(load_state_dict(path)["layer.weight"], torch.arange(30, dtype=torch.float32).view(6, 5))
        assert len(weights_digest(path)) == 64
