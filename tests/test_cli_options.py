"""Hypothesis over the numeric options of `imgclf train`, `predict`, `serve` and `audit`: any
combination is either refused at once, in one line that names a bad option, or accepted;
never a traceback, never work done before the check.

Values and the oracle come from the option schema (imgclf.options): each option's interval
says what is valid, and this file reads the interval itself (its ends, which of them belong,
whole numbers or not) rather than asking the validator, so a validator that drifts from its
table fails here. That the table says what the docs say is tests/test_options.py's job.
"""

import math
import os

import pytest

pytest.importorskip("torch")

from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from imgclf.cli import main  # noqa: E402
from imgclf.options import COMMANDS, Interval, Option  # noqa: E402

from .conftest import PREDICT  # noqa: E402

EXPLORE = os.environ.get("IMGCLF_FUZZ") == "explore"

#: command -> (its arguments before the options, with {tmp}; what it says once every option is good)
BASE = {
    "train": (["{tmp}/no-such-folder", "--out", "{tmp}/m.imgclf"], ("no such folder",)),
    "predict": (["{tmp}/missing.imgclf", str(PREDICT)], ("model file not found", "needs Ray Data")),
    "serve": (["{tmp}/missing.imgclf"], ("model file not found",)),
    "audit": (["{tmp}/no-such-folder"], ("no such folder",)),
}
#: what to give for a switch an option needs that is not itself an on/off flag
SWITCH_ARGS = {"out": ["--out", "{tmp}/results.parquet"], "engine=ray": ["--engine", "ray", "--out", "{tmp}/r.jsonl"]}


def numeric(command: str) -> dict[str, Option]:
    """flag -> option, for the command's options with a number range."""
    return {o.flag: o for o in COMMANDS[command].cli_options if isinstance(o.constraint, Interval)}


def switches(command: str) -> list[str]:
    """The switches (``fine_tune``, ``engine=ray``, ``out``) that the command's numeric options need."""
    return sorted({o.needs for o in numeric(command).values() if o.needs})


def switch_args(command: str, switch: str) -> list[str]:
    if switch in SWITCH_ARGS:
        return SWITCH_ARGS[switch]
    return [COMMANDS[command][switch].flag]


def documented(option: Option, value) -> bool:
    """Whether ``value`` (parsed) is in the option's interval, read from its ends."""
    rng = option.constraint
    if value is None or isinstance(value, float) and not math.isfinite(value):
        return False
    if rng.low is not None and (value < rng.low or (value == rng.low and rng.closed not in ("both", "left"))):
        return False
    return rng.high is None or value < rng.high or (value == rng.high and rng.closed in ("both", "right"))


def edges(option: Option) -> list:
    """Values on and just beside the interval's ends, where validators go wrong."""
    rng, out = option.constraint, []
    for end in (rng.low, rng.high):
        if end is None:
            continue
        if option.type is int:
            out += [int(end) - 1, int(end), int(end) + 1]
        else:
            out += [end, math.nextafter(end, -math.inf), math.nextafter(end, math.inf), end - 1, end + 1]
    return out


NUMBER = (
    st.integers(-(2**70), 2**70)
    | st.sampled_from([0, 1, -1, 2**32, 2**32 - 1])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0.0, 0.5, 1.0, -0.0, 1e-300, 1e300])
)
JUNK = st.text(alphabet="0123456789.-+eEinfa x", max_size=6)


def inside(option: Option) -> st.SearchStrategy:
    """Values the interval holds (most of the time: an open end may still be drawn; the oracle decides)."""
    rng = option.constraint
    if option.type is int:
        return st.integers(None if rng.low is None else int(rng.low), None if rng.high is None else int(rng.high))
    return st.floats(rng.low, rng.high, allow_nan=False, allow_infinity=False,
                     exclude_min=rng.low is not None and rng.closed in ("right", "neither"),
                     exclude_max=rng.high is not None and rng.closed in ("left", "neither"))  # fmt: skip


def value_text(option: Option) -> st.SearchStrategy[str]:
    """Text for one option: values inside its range, its edges, any number, and junk that is not a number."""
    return st.one_of(inside(option).map(str), st.sampled_from(edges(option)).map(str), NUMBER.map(str), JUNK)


def parses(kind, text: str):
    try:
        return kind(text)
    except ValueError:
        return None


@st.composite
def argvs(draw, command: str):
    options, chosen = numeric(command), {}
    for flag in draw(st.lists(st.sampled_from(sorted(options)), max_size=4, unique=True)):
        chosen[flag] = draw(value_text(options[flag]))
    on = draw(st.sets(st.sampled_from(switches(command)))) if switches(command) else set()
    return chosen, on


def run(command: str, chosen: dict[str, str], on: set[str], tmp_path, capsys) -> None:
    base, accepted = BASE[command]
    argv = [command, *(a.replace("{tmp}", str(tmp_path)) for a in base)]
    for flag, text in chosen.items():
        argv += [f"{flag}={text}"]  # '=' keeps values such as '-1' from reading as options
    for switch in sorted(on):
        argv += [a.replace("{tmp}", str(tmp_path)) for a in switch_args(command, switch)]
    options = numeric(command)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse: a value that is not a number (of the option's kind) at all
        err = capsys.readouterr().err
        assert e.code == 2 and err.startswith(f"usage: imgclf {command}") and "error: argument" in err
        assert any(parses(options[f].type, t) is None for f, t in chosen.items())
        event("not a number")
        return
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("imgclf: error:"), err
    assert out == ""  # nothing printed, nothing done: every option is checked before any input is read
    on_now = set(on) | ({"out"} if "engine=ray" in on else set())
    invalid = [f for f, t in chosen.items()
               if not documented(options[f], parses(options[f].type, t)) or (options[f].needs or "") not in
               {"", *on_now}]  # fmt: skip
    if invalid:
        assert any(flag in lines[0] for flag in invalid), (lines[0], invalid)
        event("refused")
    else:
        assert any(said in lines[0] for said in accepted), lines[0]
        event("accepted")


FUZZ = settings(
    max_examples=1000 if EXPLORE else 40,
    deadline=None,
    database=None,
    derandomize=not EXPLORE,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(drawn=argvs("train"))
def test_any_train_options_are_refused_in_one_line_or_accepted(drawn, tmp_path, capsys):
    run("train", *drawn, tmp_path, capsys)


@FUZZ
@given(drawn=argvs("predict"))
def test_any_predict_options_are_refused_in_one_line_or_accepted(drawn, tmp_path, capsys):
    run("predict", *drawn, tmp_path, capsys)


@FUZZ
@given(drawn=argvs("serve"))
def test_any_serve_options_are_refused_in_one_line_or_accepted(drawn, tmp_path, capsys):
    pytest.importorskip("fastapi")
    run("serve", *drawn, tmp_path, capsys)


@FUZZ
@given(drawn=argvs("audit"))
def test_any_audit_options_are_refused_in_one_line_or_accepted(drawn, tmp_path, capsys):
    run("audit", *drawn, tmp_path, capsys)


def test_the_fuzzed_commands_cover_every_numeric_option():
    """A command with a number range left out of the fuzz tests would go unchecked there."""
    fuzzed = set(BASE)
    left_out = [f"{c} {f}" for c in COMMANDS if c not in fuzzed for f in numeric(c)]
    assert not left_out, f"add these commands to BASE: {left_out}"


def outside(option: Option) -> str:
    """A value just outside the option's interval."""
    rng = option.constraint
    if rng.low is not None:
        return str(rng.low if rng.closed in ("right", "neither") else rng.low - 1)
    return str(rng.high if rng.closed in ("left", "neither") else rng.high + 1)


@pytest.mark.parametrize("command, flag", [(c, f) for c in BASE for f in numeric(c)])
def test_a_refused_value_is_named_by_its_flag_never_its_python_name(command, flag, tmp_path, capsys):
    """Issue 21 item 9: `--max-pixels 0` said "max_pixels must be ...", `--read-timeout 0` "read_timeout",
    `--max-memory-gb 0` "max_memory_gb" (the library's names; fixed when the option schema came, issue 20)."""
    option = numeric(command)[flag]
    argv = [command, *(a.replace("{tmp}", str(tmp_path)) for a in BASE[command][0]), f"{flag}={outside(option)}"]
    if option.needs:
        argv += [a.replace("{tmp}", str(tmp_path)) for a in switch_args(command, option.needs)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"imgclf: error: {flag} must be "), err
    python_names = [o.name for o in COMMANDS[command] if "_" in o.name and o.name in err.replace(flag, "")]
    assert not python_names, err


def test_every_train_option_the_trainer_takes_reaches_it():
    """`train --unknown-rate` was checked and then never given to the trainer: every model got 0.05.
    Each option of `imgclf train` that is also an ImageClassificationTrainer parameter is passed by name."""
    import ast
    import inspect

    from imgclf import cli
    from imgclf.training.trainer import ImageClassificationTrainer

    tree = ast.parse(inspect.getsource(cli._train))
    (call,) = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "ImageClassificationTrainer"]
    passed = {k.arg for k in call.keywords} | ({"arch"} if call.args else set())
    takes = set(inspect.signature(ImageClassificationTrainer).parameters)
    assert {o.name for o in COMMANDS["train"].cli_options} & takes - passed == set()
