"""Hypothesis over `imgclf train`'s options: any combination is either refused at once, in one line
that names a bad option, or accepted; never a traceback, never work done before the check."""

import math
import os

import pytest

pytest.importorskip("torch")

from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from imgclf.cli import main  # noqa: E402

EXPLORE = os.environ.get("IMGCLF_FUZZ") == "explore"

#: option -> (argparse type, what the README says is valid, words an error about it contains)
OPTIONS = {
    "--epochs": (int, lambda v: v >= 1, ("epochs",)),
    "--batch-size": (int, lambda v: v >= 1, ("batch_size",)),
    "--learning-rate": (float, lambda v: 0 < v < math.inf, ("learning_rate",)),
    "--test-fraction": (float, lambda v: 0 < v < 1, ("--test-fraction",)),
    "--validation-fraction": (float, lambda v: 0 < v < 1, ("validation_fraction", "--validation-fraction")),
    "--seed": (int, lambda v: 0 <= v < 2**32, ("seed",)),
    "--patience": (int, lambda v: v >= 1, ("patience",)),
    "--min-delta": (float, lambda v: 0 <= v < math.inf, ("min_delta", "--min-delta")),
    "--unfreeze": (int, lambda v: v >= 1, ("unfreeze",)),
    "--fine-tune-epochs": (int, lambda v: v >= 1, ("fine-tune epochs", "--fine-tune-epochs")),
    "--max-memory-gb": (float, lambda v: 0 < v < 1e9, ("max_memory_gb",)),
    "--nproc-per-node": (int, lambda v: v >= 1, ("--nproc-per-node",)),
}
SWITCH_OF = {"--patience": "--early-stopping", "--min-delta": "--early-stopping", "--unfreeze": "--fine-tune",
             "--fine-tune-epochs": "--fine-tune", "--max-memory-gb": "--fine-tune"}  # fmt: skip

NUMBER = (
    st.integers(-(2**70), 2**70)
    | st.sampled_from([0, 1, -1, 2**32, 2**32 - 1])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0.0, 0.5, 1.0, -0.0, 1e-300, 1e300])
)
NUMERAL = NUMBER.map(str)
VALUE = st.one_of(NUMERAL, NUMERAL, NUMERAL, st.text(alphabet="0123456789.-+eEinfa x", max_size=6))


def parses(kind, text: str):
    try:
        return kind(text)
    except ValueError:
        return None


@settings(
    max_examples=1000 if EXPLORE else 60,
    deadline=None,
    database=None,
    derandomize=not EXPLORE,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    chosen=st.dictionaries(st.sampled_from(sorted(OPTIONS)), VALUE, max_size=4),
    switches=st.sets(st.sampled_from(["--early-stopping", "--fine-tune"])),
)
def test_any_train_options_are_refused_in_one_line_or_accepted(chosen, switches, tmp_path, capsys):
    argv = ["train", str(tmp_path / "no-such-folder"), "--out", str(tmp_path / "m.imgclf")]
    for option, text in chosen.items():
        argv += [f"{option}={text}"]  # '=' keeps values such as '-1' from reading as options
    argv += sorted(switches)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse: a value that is not a number at all
        err = capsys.readouterr().err
        assert e.code == 2 and err.startswith("usage: imgclf train") and "error: argument" in err
        assert any(parses(OPTIONS[o][0], t) is None for o, t in chosen.items())
        event("not a number")
        return
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("imgclf: error:"), err
    assert out == ""  # nothing printed, nothing done: every option is checked before the folder is read
    values = {o: parses(OPTIONS[o][0], t) for o, t in chosen.items()}
    invalid = [
        o for o, v in values.items() if not OPTIONS[o][1](v) or (o in SWITCH_OF and SWITCH_OF[o] not in switches)
    ]
    if invalid:
        assert any(word in lines[0] for o in invalid for word in (*OPTIONS[o][2], o)), (lines[0], invalid)
        event("refused")
    else:
        assert "no such folder" in lines[0], lines[0]
        event("accepted")
