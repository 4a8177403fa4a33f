"""The option schema (imgclf.options) against the command line built from it, the numbers
the docs state, and the library signatures that share its defaults."""

from __future__ import annotations

import argparse
import ast
import inspect
import math
from dataclasses import fields
from pathlib import Path

import pytest

from imgclf.cli import build_parser
from imgclf.errors import OptionError
from imgclf.options import COMMANDS, NETWORK, Choices, Interval, check, help_text, install_hint, validate

ROOT = Path(__file__).resolve().parent.parent


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


# ---- (b) the command line and the schema are the same set of options ----


def test_every_command_is_in_the_schema_and_every_schema_command_on_the_command_line():
    assert list(subparsers(build_parser())) == list(COMMANDS)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_the_command_lines_options_are_the_schemas(command):
    """Fails when an option is added to the command line without the schema, or to the schema
    without the command line; then checks each flag says what its option declares."""
    parser = subparsers(build_parser())[command]
    actions = {a.dest: a for a in parser._actions if not isinstance(a, argparse._HelpAction)}
    schema = COMMANDS[command]
    assert sorted(actions) == sorted(o.name for o in schema.cli_options), (
        f"imgclf {command}: options on the command line but not in imgclf.options "
        f"{sorted(set(actions) - {o.name for o in schema.cli_options})}, in the schema but not on the command "
        f"line {sorted({o.name for o in schema.cli_options} - set(actions))}"
    )
    for option in schema.cli_options:
        action = actions[option.name]
        if option.positional:
            assert action.option_strings == [] and action.nargs == option.nargs
            continue
        assert action.option_strings == [f for f in (option.short, option.flag) if f]
        assert action.default == (None if option.needs else option.default), option.name
        if option.type is bool:
            assert action.nargs == 0 and action.const is True
        else:
            assert action.type == (option.type if option.type in (int, float) else None), option.name
        if isinstance(option.constraint, Choices):
            assert tuple(action.choices) == option.constraint.values
        else:
            assert action.choices is None
        assert action.help.replace("%%", "%") == help_text(schema, option)
    library_only = [o.name for o in schema if not o.cli]
    assert not set(library_only) & set(actions)


#: Flags that cannot be spelled from their parameter's name, each with why.
FLAG_EXCEPTIONS = {("train", "from_model"): "--from"}  # 'from' is a Python keyword: no parameter can be named so


def test_flags_are_derived_from_the_parameter_names():
    for schema in COMMANDS.values():
        for option in schema.cli_options:
            if not option.positional:
                derived = "--" + option.name.replace("_", "-")
                wanted = FLAG_EXCEPTIONS.get((schema.name, option.name), derived)
                assert option.flag == wanted, (schema.name, option.name)


def test_every_option_has_help_and_every_needed_switch_is_an_option():
    for schema in COMMANDS.values():
        for option in schema.cli_options:
            assert option.help, f"{schema.name} {option.flag}: no help"
            if option.needed:
                assert option.needed[0] in schema, (schema.name, option.name)


# ---- (c) the schema's defaults and ranges are the numbers the docs state ----

#: (command, parameter) -> the default the README and docs state, written here, not read from the schema
DOCUMENTED_DEFAULTS = {
    ("train", "epochs"): 50,  # docs/python-api.md: epochs=50
    ("train", "batch_size"): 10,  # docs/python-api.md: batch_size=10
    ("train", "learning_rate"): 0.01,  # docs/python-api.md: learning_rate=0.01
    ("train", "lr_schedule"): "exponential",  # docs/python-api.md: "0.01 decayed by 0.94 every 2 epochs"
    ("train", "decay_rate"): 0.94,
    ("train", "decay_epochs"): 2,
    ("train", "test_fraction"): 0.2,  # docs/quickstart.md: "holds a stratified 20% of the photos out"
    ("train", "seed"): 1,  # README: train_test_split(images, test_fraction=0.2, seed=1)
    ("train", "arch"): "efficientnet_lite0",  # README
    ("train", "out"): "imageClassifier.imgclf",  # docs/serving.md: imgclf serve imageClassifier.imgclf
    ("train", "patience"): 10,
    ("train", "min_delta"): 0.0,
    ("train", "early_stopping_metric"): "accuracy",
    ("train", "fine_tune_epochs"): 10,
    ("train", "device"): "auto",
    ("predict", "top_k"): 1,
    ("predict", "batch_size"): 32,
    ("predict", "commit_every"): 30,  # docs/scoring-at-scale.md: "every --commit-every seconds (30)"
    ("predict", "device"): "cpu",
    ("predict", "engine"): "auto",
    ("predict", "precision"): "auto",
    ("evaluate", "device"): "cpu",
    ("report", "device"): "cpu",
    ("audit", "device"): "auto",
    ("audit", "test_fraction"): 0.2,  # docs/report-and-audit.md: same --test-fraction and --seed as train
    ("audit", "seed"): 1,
    ("serve", "host"): "127.0.0.1",  # docs/serving.md: binds 127.0.0.1:8000
    ("serve", "port"): 8000,
    ("serve", "max_batch"): 16,
    ("serve", "max_wait_ms"): 5,
    ("serve", "max_request_mb"): 10,  # docs/reliability.md: 10 MB per request (--max-request-mb)
    ("serve", "max_pixels"): 50_000_000,  # docs/serving.md: --max-pixels (50 megapixels)
    ("serve", "read_timeout"): 30,  # docs/serving.md: nothing for --read-timeout, 30 s
    ("serve", "max_files"): 64,  # docs/serving.md: one to 64 files
    ("serve", "max_request_bytes"): 10 * 1024 * 1024,
    ("export", "precision"): "fp32",
    ("report", "out"): "report",
}


@pytest.mark.parametrize("command, name", sorted(DOCUMENTED_DEFAULTS))
def test_defaults_are_the_documented_ones(command, name):
    assert COMMANDS[command].default(name) == DOCUMENTED_DEFAULTS[command, name]


#: (command, parameter) -> (values the docs say are valid, values they say are not)
DOCUMENTED_RANGES = {
    ("train", "epochs"): ([1, 500], [0, -1, 2.0, True]),
    ("train", "batch_size"): ([1, 10], [0, 1.5]),
    ("train", "learning_rate"): ([1e-6, 0.01, 10, 1e37], [0, -0.01, 1e39, 1e308, math.inf, math.nan]),  # 1e308: a traceback
    ("train", "test_fraction"): ([0.01, 0.2, 0.99], [0, 1, 1.5, -0.2, math.nan]),  # in (0, 1)
    ("train", "validation_fraction"): ([0.1, None], [0, 1]),
    ("train", "seed"): ([0, 1, 2**32 - 1], [-1, 2**32, 1.0]),  # in [0, 2**32)
    ("train", "momentum"): ([0, 0.9], [1, -0.1]),
    ("train", "patience"): ([1], [0]),
    ("train", "min_delta"): ([0, 0.5], [-0.1, math.inf]),
    ("train", "nproc_per_node"): ([1, 8], [0, -1]),
    ("train", "max_memory_gb"): ([0.01, 64], [0, -1, 1e9]),
    ("train", "lr_schedule"): (["exponential", "polynomial", "constant"], ["cosine"]),
    ("train", "class_weight"): (["balanced", None], ["inverse"]),
    ("train", "frame"): (["whole", "crop", None], ["squash"]),
    ("train", "device"): (["auto", "cpu", "cuda", "cuda:1", "mps"], ["gpu", "cuda:x", ""]),
    ("predict", "top_k"): ([1, 5], [0, -1]),
    ("predict", "batch_size"): ([1, 32], [0]),
    ("predict", "commit_every"): ([0, 30], [-1]),
    ("predict", "cpus_per_worker"): ([0.5, 1], [0, -1]),
    ("predict", "gpus_per_worker"): ([0, 0.25], [-1]),
    ("predict", "engine"): (["auto", "onnxruntime", "openvino", "torch", "ray"], ["tensorrt"]),
    ("predict", "precision"): (["auto", "fp32", "bf16", "int8"], ["fp16"]),
    ("serve", "port"): ([1, 8000, 65535], [0, 65536]),
    ("serve", "max_batch"): ([1, 16, 64], [0, 65, 100_000_000]),  # 1 turns batching off; 1e8 tried to allocate 55 TiB
    ("serve", "max_wait_ms"): ([0, 5], [-1]),
    ("serve", "max_request_mb"): ([0.5, 10], [0, 1e9, 1e308]),
    ("serve", "max_pixels"): ([1, 150_000_000], [0, 150_000_001]),  # the decoder's own guard: 150 MP
    ("serve", "decode_memory_mb"): ([16, 512], [15.9, 1e308]),  # at least 16 MB
    ("serve", "read_timeout"): ([0.1, 30], [0]),
    ("audit", "folds"): ([2, 5], [1]),
    ("export", "precision"): (["fp32", "int8"], ["bf16"]),
}


@pytest.mark.parametrize("command, name", sorted(DOCUMENTED_RANGES))
def test_ranges_are_the_documented_ones(command, name):
    valid, invalid = DOCUMENTED_RANGES[command, name]
    for value in valid:
        validate(command, {name: value})
    for value in invalid:
        with pytest.raises(OptionError) as e:
            validate(command, {name: value})
        assert e.value.parameter == name and str(e.value).startswith(f"{name} must be ")


# ---- validate ----


def test_errors_name_the_parameter_and_the_command_line_spells_the_flag():
    with pytest.raises(OptionError) as e:
        validate("train", {"test_fraction": 1.5})
    assert str(e.value) == "test_fraction must be a number between 0 and 1 (exclusive), got 1.5"
    assert e.value.spelled(COMMANDS["train"].flags) == (
        "--test-fraction must be a number between 0 and 1 (exclusive), got 1.5"
    )


def test_an_option_without_its_switch_is_refused_not_ignored():
    with pytest.raises(OptionError, match="patience only applies with early_stopping") as e:
        validate("train", {"patience": 3, "early_stopping": False})
    assert e.value.spelled(COMMANDS["train"].flags) == (
        "--patience only applies with --early-stopping; add --early-stopping or drop --patience"
    )
    validate("train", {"patience": 3, "early_stopping": True})
    validate("train", {"patience": 3})  # a library caller without the switch: nothing to compare
    with pytest.raises(OptionError, match="workers only applies with engine ray"):
        validate("predict", {"workers": 2, "engine": "auto"})
    validate("predict", {"workers": 2, "engine": "ray"})
    with pytest.raises(OptionError, match="give validation_folder or validation_fraction, not both"):
        validate("train", {"validation_fraction": 0.2, "validation_folder": "v"})


def test_braces_in_a_value_do_not_break_the_message():
    with pytest.raises(OptionError) as e:
        validate("train", {"lr_schedule": "{x}"})
    assert "got '{x}'" in str(e.value) and "got '{x}'" in e.value.spelled(COMMANDS["train"].flags)


def test_a_name_that_is_not_an_option_is_a_mistake_in_the_caller():
    with pytest.raises(KeyError):
        validate("train", {"epoch": 5})


def test_required_refuses_none_where_the_option_may_be_left_out():
    check(COMMANDS["train"]["nproc_per_node"], None)
    with pytest.raises(OptionError, match="nproc_per_node must be a positive integer, got None"):
        check(COMMANDS["train"]["nproc_per_node"], None, required=True)


def test_interval_descriptions():
    assert Interval(int, 1, None).describe() == "a positive integer"
    assert Interval(int, 0, 2**32, "left").describe() == "an integer from 0 to 4,294,967,295"
    assert Interval(float, 0, 1, "neither").describe() == "a number between 0 and 1 (exclusive)"
    assert Interval(float, 0, 1, "left").describe() == "a number >= 0 and < 1"
    assert Interval(float, 0, None, "neither").describe() == "a positive number"
    assert 2**70 in Interval(int, 1, None) and 2.0 not in Interval(int, 1, None) and True not in Interval(int, 0, 1)


# ---- one source: the library shares the schema's names, defaults and constraints ----


def _defaults(function) -> dict:
    return {n: p.default for n, p in inspect.signature(function).parameters.items() if p.default is not p.empty}


def _agree(function, schema, skip=()) -> None:
    shared = {n: d for n, d in _defaults(function).items() if n in schema and n not in skip}
    assert shared, function
    wrong = {n: (d, schema[n].default) for n, d in shared.items() if d != schema[n].default}
    assert not wrong, f"{function.__qualname__}: signature default != schema default: {wrong}"


def test_library_signatures_use_the_schemas_defaults():
    pytest.importorskip("torch")
    from imgclf.batch.local import score_to_folder
    from imgclf.batch.ray import predict_dataset, score_with_ray
    from imgclf.inference.loading import load_model
    from imgclf.insight.audit import audit
    from imgclf.nets.engines import choose_engine
    from imgclf.spark import predict_udf
    from imgclf.training.finetune import FineTuneOptions
    from imgclf.training.history import EarlyStopping
    from imgclf.training.trainer import ImageClassificationTrainer

    _agree(ImageClassificationTrainer.__init__, COMMANDS["train"], skip=("early_stopping",))
    _agree(ImageClassificationTrainer.fit_and_hold_out, COMMANDS["train"])
    _agree(audit, COMMANDS["audit"])
    for function in (score_to_folder, score_with_ray, predict_dataset, predict_udf):
        _agree(function, COMMANDS["predict"])
    _agree(choose_engine, NETWORK)
    _agree(load_model, NETWORK)
    for cls in (EarlyStopping, FineTuneOptions):
        declared = {f.name: f.default for f in fields(cls)}
        for name, option in (cls.OPTIONS if cls is EarlyStopping else cls.TRAIN_OPTIONS).items():
            assert declared[name] == COMMANDS["train"][option].default, (cls.__name__, name)


def test_serve_signatures_use_the_schemas_defaults():
    pytest.importorskip("fastapi")
    from imgclf.serve.app import create_app
    from imgclf.serve.batching import Batcher

    _agree(create_app, COMMANDS["serve"])
    _agree(Batcher.__init__, COMMANDS["serve"])


def test_library_errors_name_parameters():
    pytest.importorskip("torch")
    from imgclf.training.history import EarlyStopping
    from imgclf.training.trainer import ImageClassificationTrainer

    with pytest.raises(OptionError, match=r"^epochs must be a positive integer, got 0$"):
        ImageClassificationTrainer(epochs=0).validate()
    with pytest.raises(OptionError, match=r"^test_fraction must be a number between 0 and 1"):
        ImageClassificationTrainer().fit_and_hold_out([], test_fraction=1.0)
    with pytest.raises(OptionError, match=r"^early_stopping\.patience must be a positive integer, got 0$"):
        EarlyStopping(patience=0)


def test_names_tables_are_the_engines():
    from imgclf.nets.device import DEVICES
    from imgclf.nets.engines import ENGINE_NAMES, ENGINES, PRECISIONS
    from imgclf.options import DEVICES as OPTION_DEVICES
    from imgclf.options import ENGINE_NAMES as OPTION_ENGINES
    from imgclf.options import EXTRAS
    from imgclf.options import PRECISIONS as OPTION_PRECISIONS

    assert ENGINE_NAMES == OPTION_ENGINES == ("auto", *ENGINES)
    assert PRECISIONS is OPTION_PRECISIONS and DEVICES is OPTION_DEVICES
    assert all(spec.extra in EXTRAS for spec in ENGINES.values())


def test_extras_are_pyprojects_and_the_hint_is_one_format():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    from imgclf.options import EXTRA_FOR_MODULE, EXTRAS

    assert set(EXTRAS) == set(declared)
    assert set(EXTRA_FOR_MODULE.values()) <= set(EXTRAS)
    assert install_hint("ray") == "pip install 'imgclf[ray]'"
    with pytest.raises(KeyError):
        install_hint("rays")


def test_no_literal_install_hint_is_left_in_the_code():
    """Messages say what to install through install_hint; docstrings may show the command."""
    found = []
    for path in (ROOT / "src" / "imgclf").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr)}  # fmt: skip
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if "pip install 'imgclf[" in node.value and path.name != "options.py":
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, f"use imgclf.options.install_hint: {found}"


def test_the_options_module_imports_nothing_heavy():
    """--help reads it: the standard library and imgclf.errors only."""
    tree = ast.parse((ROOT / "src" / "imgclf" / "options.py").read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "ipaddress", "math", "numbers", "re", "collections.abc", "dataclasses", "typing",
                        "imgclf.errors"}, imported  # fmt: skip
