"""Which engine runs the network, at which precision: one table, one choice.

Every path that runs the network (feature extraction in training, ``predict``,
``evaluate``, batch scoring here and in Ray actors, ``serve``) asks
:func:`choose_engine`, and nothing else decides. What each engine can do is data
in :data:`ENGINES`; which one ``auto`` prefers at each precision is
:data:`AUTO_ORDER`, set by measurement (``benchmarks/throughput.py``, README
"Engines and precision"):

- fp32 on a CPU: ONNX Runtime. OpenVINO fp32 is slower on EfficientNet-Lite
  (0.8x on an AMD EPYC), eager PyTorch about 3x slower.
- bf16: OpenVINO, only where the CPU multiplies bf16 natively (AVX-512 bf16 or
  AMX; OpenVINO lists ``BF16`` in its optimization capabilities). Elsewhere
  OpenVINO would silently run fp32, so asking for it is an error.
- int8 (the model's own static QDQ graph, calibrated by NNCF on its training
  images, see :mod:`imgclf.inference.precision`): OpenVINO (1.7x ONNX Runtime fp32
  on the AMD EPYC, which has no VNNI). ONNX Runtime runs that graph too, but
  slower than fp32, so ``auto`` takes int8 only where OpenVINO is installed.
- GPUs: eager PyTorch.

``precision="auto"`` takes, in this order: int8 when the model carries an int8
graph whose recorded held-out accuracy is within half a point of fp32 with top
labels equal on at least 99% of the held-out images; bf16 where the CPU does it
natively, under the same rule; fp32 otherwise. A job known to be small (under
:data:`COMPILE_MIN_IMAGES` images) stays at fp32, since compiling a second graph
would cost more than it saves. All engines read the same exported ONNX graph
(:mod:`imgclf.nets.onnx_graph`); OpenVINO is imported only when it runs.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf.errors import MissingDependencyError, OptionError

PRECISIONS = ("auto", "fp32", "bf16", "int8")


@dataclass(frozen=True)
class EngineSpec:
    """What one engine needs and can do."""

    name: str
    module: str  # the import it needs
    extra: str  # pip install 'imgclf[extra]' brings it
    precisions: tuple[str, ...]
    devices: tuple[str, ...]  # "cpu", or "gpu" for any accelerator torch knows
    runs_onnx_files: bool  # an exported .onnx file (torch-free) can run on it
    summary: str


ENGINES: dict[str, EngineSpec] = {
    spec.name: spec
    for spec in (
        EngineSpec("onnxruntime", "onnxruntime", "runtime", ("fp32", "int8"), ("cpu",), True,
                   "ONNX Runtime on the CPU: the fastest fp32 engine measured here"),
        EngineSpec("openvino", "openvino", "openvino", ("fp32", "bf16", "int8"), ("cpu",), True,
                   "OpenVINO on the CPU: bf16 where the CPU has it natively, the fastest int8"),
        EngineSpec("torch", "torch", "train", ("fp32",), ("cpu", "gpu"), False,
                   "eager PyTorch, channels-last: GPUs, and CPUs without the other two"),
    )
}  # fmt: skip
ENGINE_NAMES = ("auto", *ENGINES)

#: Which engine ``auto`` takes at each precision on a CPU, fastest first (measured).
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "fp32": ("onnxruntime", "openvino", "torch"),
    "bf16": ("openvino",),
    "int8": ("openvino", "onnxruntime"),
}

#: Below this many images, ``auto`` stays at fp32: importing OpenVINO and compiling a
#: second graph costs 1 to 2.5 s here, which a 1.7x faster network repays only after
#: some 400 to 500 images (10.7 ms -> 6.3 ms an image at batch 32 on 2 cores).
COMPILE_MIN_IMAGES = 400

#: Largest change of held-out accuracy (fraction) at which ``auto`` still takes a precision.
ACCURACY_TOLERANCE = 0.005
#: Smallest share of held-out images whose top label must equal fp32's for ``auto`` to take a precision.
AGREEMENT_MINIMUM = 0.99


@dataclass(frozen=True)
class EngineChoice:
    """The engine and precision that will run the network, and why (one line)."""

    engine: str
    precision: str
    reason: str

    def describe(self) -> str:
        return f"engine {self.engine}, {self.precision} ({self.reason})"


def installed(engine: str) -> bool:
    """Whether ``engine``'s package can be imported here (without importing it)."""
    return importlib.util.find_spec(ENGINES[engine].module) is not None


def onnxruntime_available() -> bool:
    return installed("onnxruntime") and importlib.util.find_spec("onnx") is not None


def _runs(engine: str, onnx_file: bool) -> bool:
    """Whether ``engine`` can run the network here: a torch module reaches ONNX
    engines through an export, which needs the ``onnx`` package."""
    spec = ENGINES[engine]
    if onnx_file:
        return spec.runs_onnx_files and installed(engine)
    return installed(engine) and (engine == "torch" or importlib.util.find_spec("onnx") is not None)


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags on Linux x86 (from /proc/cpuinfo); None where unknown."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return None


@functools.cache
def openvino_capabilities() -> tuple[str, ...]:
    """OpenVINO's ``OPTIMIZATION_CAPABILITIES`` of the CPU (e.g. FP32, BF16, INT8); () without OpenVINO."""
    if not installed("openvino"):
        return ()
    return tuple(_openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively, as OpenVINO sees it.

    On Linux x86 the CPU flags answer "no" without importing OpenVINO (0.4 s),
    which keeps a small job's start-up short; OpenVINO has the last word.
    """
    flags = _cpu_flags()
    if flags is not None and not flags & {"avx512_bf16", "amx_bf16"}:
        return False
    return "BF16" in openvino_capabilities()


def cpu_name() -> str:
    """The CPU's model name, for reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _measured(accuracy: dict | None, precision: str) -> tuple[float, float | None] | None:
    """(held-out accuracy change against fp32, top-label agreement) recorded for ``precision``."""
    try:
        entry, reference = accuracy[precision], accuracy["fp32"]
        change = float(entry["micro_accuracy"]) - float(reference["micro_accuracy"])
    except (KeyError, TypeError, ValueError):
        return None
    agreement = entry.get("top_label_agreement")
    return change, None if agreement is None else float(agreement)


def _passes(accuracy: dict | None, precision: str) -> tuple[bool, str]:
    """Whether the recorded held-out metrics let ``auto`` take ``precision``, and why."""
    measured = _measured(accuracy, precision)
    if measured is None:
        return False, f"{precision} held-out accuracy not recorded in the model"
    change, agreement = measured
    said = f"held-out accuracy {100 * change:+.1f} points"
    if agreement is not None:
        said += f", top labels {100 * agreement:.1f}% equal to fp32"
    ok = abs(change) <= ACCURACY_TOLERANCE + 1e-9 and (agreement is None or agreement >= AGREEMENT_MINIMUM)
    return ok, said


def _auto_precision(engine: str, images: int | None, accuracy: dict | None, int8_ready: bool) -> tuple[str, str]:
    """int8, bf16 or fp32 for ``precision="auto"``, with the reason; cheapest checks first."""
    if images is not None and images < COMPILE_MIN_IMAGES:
        return "fp32", f"{images} image(s): compiling a faster graph would cost more than it saves"
    notes = []
    if int8_ready and engine in ("auto", "openvino") and installed("openvino"):
        ok, said = _passes(accuracy, "int8")
        if ok:
            return "int8", f"calibrated int8 graph, {said}"
        notes.append(f"int8 not taken: {said}")
    if engine not in ("auto", "openvino"):
        return "fp32", "; ".join(notes) or f"{engine} runs fp32"
    if not installed("openvino"):
        notes.append("bf16 would need OpenVINO: pip install 'imgclf[openvino]'")
    elif not native_bf16():
        notes.append("this CPU has no native bf16")
    else:
        ok, said = _passes(accuracy, "bf16")
        if ok:
            return "bf16", f"this CPU has native bf16; {said}"
        notes.append(f"bf16 not taken: {said}")
    return "fp32", "; ".join(notes) or "the default"


def choose_engine(
    engine: str = "auto",
    precision: str = "auto",
    *,
    device: str = "cpu",
    images: int | None = None,
    accuracy: dict | None = None,
    onnx_file: bool = False,
    int8_ready: bool = False,
) -> EngineChoice:
    """The one place that decides which engine runs the network, at which precision.

    ``images``: how many images the job has, if known (small jobs stay on ONNX
    Runtime); ``accuracy``: the model's recorded held-out metrics per precision
    (``precision_metrics``), which keep ``auto`` off a precision that moved
    accuracy; ``onnx_file``: the network is an exported file, so torch cannot run it;
    ``int8_ready``: the model carries a calibrated int8 graph (or is one).
    Raises :class:`OptionError` for a combination that cannot run and
    :class:`MissingDependencyError` (naming the extra) for an engine not installed.
    """
    if engine not in ENGINE_NAMES:
        raise OptionError(f"engine must be one of {', '.join(ENGINE_NAMES)}, got '{engine}'")
    if precision not in PRECISIONS:
        raise OptionError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    if device != "cpu":
        if engine not in ("auto", "torch") or precision not in ("auto", "fp32"):
            raise OptionError(f"on {device} the network runs on torch in fp32; use --device cpu for "
                              f"--engine {engine} --precision {precision}")  # fmt: skip
        return EngineChoice("torch", "fp32", f"{device}: eager PyTorch")
    if engine == "auto" and precision == "auto" and not onnx_file and images is not None and images < 8:
        return EngineChoice("torch", "fp32", f"{images} image(s): eager PyTorch, no graph to build")
    if engine == "torch" and onnx_file:
        raise OptionError("an exported ONNX file runs on onnxruntime or openvino, not torch; load the .imgclf model")
    reason = "asked for"
    if precision == "auto":
        precision, reason = _auto_precision(engine, images, accuracy, int8_ready)
    elif precision == "bf16" and installed("openvino") and not native_bf16():
        caps = ", ".join(openvino_capabilities()) or "none"
        raise OptionError(f"this CPU ({cpu_name()}) has no native bf16 (OpenVINO reports {caps}), so bf16 would "
                          "run as fp32; use --precision fp32 or auto")  # fmt: skip
    elif precision == "int8":
        if not int8_ready:
            raise OptionError("this model has no calibrated int8 graph: train it with --precision int8 or auto "
                              "(calibrated on its training images), or call imgclf.calibrate_int8(model, images)")  # fmt: skip
        if _measured(accuracy, "int8") is not None:
            reason += "; " + _passes(accuracy, "int8")[1]
    if engine == "auto":
        usable = [n for n in AUTO_ORDER[precision] if _runs(n, onnx_file)]
        if not usable:
            needed = [ENGINES[n] for n in AUTO_ORDER[precision] if ENGINES[n].runs_onnx_files or not onnx_file]
            raise MissingDependencyError(f"{precision} needs {' or '.join(s.name for s in needed)}: "
                                         f"pip install 'imgclf[{needed[0].extra}]'")  # fmt: skip
        return EngineChoice(usable[0], precision, reason)
    spec = ENGINES[engine]
    if not installed(engine):
        raise MissingDependencyError(f"--engine {engine} needs {spec.module}: pip install 'imgclf[{spec.extra}]'")
    if not _runs(engine, onnx_file):
        raise MissingDependencyError(f"--engine {engine} on a torch model needs onnx: pip install 'imgclf[export]'")
    if precision not in spec.precisions:
        raise OptionError(f"--engine {engine} runs {', '.join(spec.precisions)}, not {precision}")
    return EngineChoice(engine, precision, reason)


# ---- the engines: a float32 (N, 3, S, S) batch in, the graph's first output out ----


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError("ONNX prediction needs onnxruntime: pip install 'imgclf[runtime]'") from None
    return onnxruntime


def _openvino():
    try:
        import openvino
    except ImportError:
        raise MissingDependencyError("--engine openvino needs OpenVINO: pip install 'imgclf[openvino]'") from None
    return openvino


def default_threads() -> int:
    return min(os.cpu_count() or 1, 8)


class OnnxSession:
    """An ONNX Runtime session on the CPU: float32 batch in, first output out."""

    name = "onnxruntime"

    def __init__(self, model: bytes | str | Path, threads: int | None = None, precision: str = "fp32"):
        ort = _ort()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or default_threads()
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        source = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.precision = precision

    def __call__(self, arrays: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(arrays, dtype=np.float32)})[0]

    def metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def signature(self) -> Signature:
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        return Signature(
            inputs=len(inputs),
            input_shape=[d if isinstance(d, int) else None for d in inputs[0].shape] if inputs else [],
            input_float32=bool(inputs) and inputs[0].type == "tensor(float)",
            input_type=inputs[0].type if inputs else "none",
            classes=outputs[0].shape[-1] if outputs and isinstance(outputs[0].shape[-1], int) else None,
        )


@dataclass(frozen=True)
class Signature:
    """What a compiled graph takes and gives, for checking a model file against its metadata."""

    inputs: int
    input_shape: list[int | None]  # None: a dynamic axis
    input_float32: bool
    input_type: str
    classes: int | None  # the output's last axis, None where dynamic


class OpenVinoEngine:
    """An OpenVINO model compiled for the CPU at one precision.

    fp32 and bf16 are the same graph with a different ``INFERENCE_PRECISION_HINT``;
    int8 is a quantized (QDQ) graph, whose int8 parts OpenVINO runs in int8.
    One inference request, one call at a time (the request owns its buffers).
    """

    name = "openvino"
    _HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8 comes from the graph; the rest stays f32

    def __init__(self, model: bytes | str | Path, precision: str = "fp32", threads: int | None = None):
        ov = _openvino()
        core = ov.Core()
        source = model if isinstance(model, bytes) else str(model)
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": self._HINTS[precision],
                  "INFERENCE_NUM_THREADS": threads or default_threads()}  # fmt: skip
        self.graph = core.read_model(source) if isinstance(source, str) else core.read_model(source, b"")
        self.compiled = core.compile_model(self.graph, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.precision = precision
        self._lock = threading.Lock()

    def metadata(self) -> dict[str, str]:
        """The ONNX file's metadata properties (OpenVINO keeps them under ``framework``)."""
        if not self.graph.has_rt_info(["framework"]):
            return {}
        return {k: v.astype(str) for k, v in dict(self.graph.get_rt_info()["framework"]).items()}

    def signature(self) -> Signature:
        inputs, outputs = self.compiled.inputs, self.compiled.outputs
        shape = [d.get_length() if d.is_static else None for d in inputs[0].get_partial_shape()] if inputs else []
        last = outputs[0].get_partial_shape()[-1] if outputs else None
        kind = inputs[0].get_element_type().get_type_name() if inputs else "none"
        return Signature(
            len(inputs), shape, kind == "f32", kind, last.get_length() if last and last.is_static else None
        )

    def __call__(self, arrays: np.ndarray) -> np.ndarray:
        with self._lock:
            result = self.request.infer({0: np.ascontiguousarray(arrays, dtype=np.float32)})
            return np.array(result[0], copy=True)  # the request reuses its output buffer


class TorchEngine:
    """Eager PyTorch, channels-last, inference mode."""

    name = "torch"
    precision = "fp32"

    def __init__(self, module, device: str = "cpu"):
        import torch

        self.module = module.eval().to(device).to(memory_format=torch.channels_last)
        self.device = device

    def __call__(self, arrays: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(arrays)).to(self.device)
            return self.module(x.contiguous(memory_format=torch.channels_last)).float().cpu().numpy()


def open_engine(choice: EngineChoice, graph: bytes | str | Path, threads: int | None = None):
    """The engine ``choice`` names, running the ONNX ``graph`` (bytes or a file).

    For int8, ``graph`` is the model's calibrated QDQ graph (:mod:`imgclf.inference.precision`).
    """
    if choice.engine == "onnxruntime":
        return OnnxSession(graph, threads, choice.precision)
    if choice.engine == "openvino":
        return OpenVinoEngine(graph, choice.precision, threads)
    raise OptionError(f"engine '{choice.engine}' does not run ONNX graphs")


def create_engine(
    module,
    input_size: int,
    device: str = "cpu",
    engine: str | EngineChoice = "auto",
    precision: str = "fp32",
    *,
    threads: int | None = None,
    images: int | None = None,
):
    """An engine computing the torch ``module`` on preprocessed (N, 3, size, size) arrays.

    ``engine`` is a name (chosen here with ``precision``) or a choice already made.
    Training extracts its features at fp32 (the default), so the feature cache
    never mixes precisions. int8 needs a calibrated graph, which a bare module
    does not have: the module runs at fp32 then. The engine's ``choice`` says what runs.
    """
    if isinstance(engine, EngineChoice):
        choice = engine
    else:
        choice = choose_engine(engine, "fp32" if precision == "int8" else precision, device=device, images=images)
        if precision == "int8":
            choice = EngineChoice(choice.engine, "fp32", "int8 is calibrated after training; features are fp32")
    if choice.engine == "torch":
        built = TorchEngine(module, device)
    else:
        from imgclf.nets.onnx_graph import to_onnx_bytes

        built = open_engine(choice, to_onnx_bytes(module, input_size), threads)
    built.choice = choice
    return built
