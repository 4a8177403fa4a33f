"""Which engine runs the network, at which precision: one table, one choice.

Every path that runs the network (feature extraction in training, ``predict``,
``evaluate``, ``serve``, batch scoring) asks :func:`choose_engine`, and nothing
else decides. What each engine can do is data in :data:`ENGINES`; which one
``auto`` prefers at each precision is :data:`AUTO_ORDER`, set by measurement
(``benchmarks/throughput.py``):

- fp32 on a CPU: ONNX Runtime. OpenVINO fp32 is no faster on EfficientNet-Lite
  (0.8 to 1.0x), and eager PyTorch is about 3x slower.
- bf16: OpenVINO, only where the CPU multiplies bf16 natively (AVX-512 bf16 or
  AMX; OpenVINO lists ``BF16`` in its optimization capabilities). Elsewhere
  OpenVINO would run fp32 anyway, so ``auto`` stays at fp32.
- int8 (a static QDQ graph, see :mod:`imgclf.inference.quantize`): OpenVINO runs
  it faster than ONNX Runtime (1.1 to 1.2x), ONNX Runtime when OpenVINO is absent.
- GPUs: eager PyTorch.

``precision="auto"`` never picks int8 (its labels differ from fp32 on a few
percent of images, see the README), and picks bf16 only where it is native,
the job is large enough to repay OpenVINO's start-up, and the model's recorded
held-out accuracy at bf16 is within half a point of fp32. All engines read
the same exported ONNX graph (:mod:`imgclf.nets.onnx_graph`).
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

#: Below this many images, ``auto`` stays at fp32 on ONNX Runtime even where bf16 is
#: native: importing OpenVINO and compiling the graph costs about 0.9 s here, which a
#: 1.7x faster network (5 ms -> 2.9 ms an image at batch 32) repays only after ~400 images.
BF16_MIN_IMAGES = 400

#: Largest change of held-out accuracy (fraction) at which ``auto`` still takes a precision.
ACCURACY_TOLERANCE = 0.005


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


def _accuracy_change(accuracy: dict | None, precision: str) -> float | None:
    """Held-out accuracy at ``precision`` minus at fp32, from a model's recorded metrics."""
    try:
        return float(accuracy[precision]["micro_accuracy"]) - float(accuracy["fp32"]["micro_accuracy"])
    except (KeyError, TypeError, ValueError):
        return None


def _auto_precision(engine: str, images: int | None, accuracy: dict | None) -> tuple[str, str]:
    """fp32 or bf16 for ``precision="auto"``, with the reason; cheapest checks first."""
    if engine != "auto" and "bf16" not in ENGINES[engine].precisions:
        return "fp32", f"{engine} runs fp32"
    if not installed("openvino"):
        return "fp32", "bf16 would need OpenVINO: pip install 'imgclf[openvino]'"
    if images is not None and images < BF16_MIN_IMAGES:
        return "fp32", f"{images} image(s): compiling for bf16 would cost more than it saves"
    if not native_bf16():
        return "fp32", "this CPU has no native bf16"
    change = _accuracy_change(accuracy, "bf16")
    if change is not None and abs(change) > ACCURACY_TOLERANCE:
        return "fp32", f"bf16 changed this model's held-out accuracy by {100 * change:+.1f} points"
    measured = "held-out accuracy unchanged" if change is not None else "held-out accuracy not measured at bf16"
    return "bf16", f"this CPU has native bf16; {measured}"


def choose_engine(
    engine: str = "auto",
    precision: str = "auto",
    *,
    device: str = "cpu",
    images: int | None = None,
    accuracy: dict | None = None,
    onnx_file: bool = False,
) -> EngineChoice:
    """The one place that decides which engine runs the network, at which precision.

    ``images``: how many images the job has, if known (small jobs stay on ONNX
    Runtime); ``accuracy``: the model's recorded held-out metrics per precision
    (``precision_metrics``), which keep ``auto`` off a precision that moved
    accuracy; ``onnx_file``: the network is an exported file, so torch cannot run it.
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
    if engine == "torch" and onnx_file:
        raise OptionError("an exported ONNX file runs on onnxruntime or openvino, not torch; load the .imgclf model")
    reason = "asked for"
    if precision == "auto":
        precision, reason = _auto_precision(engine, images, accuracy)
    elif precision == "bf16" and installed("openvino") and not native_bf16():
        caps = ", ".join(openvino_capabilities()) or "none"
        raise OptionError(f"this CPU ({cpu_name()}) has no native bf16 (OpenVINO reports {caps}), so bf16 would "
                          "run as fp32; use --precision fp32 or auto")  # fmt: skip
    elif precision == "int8":
        change = _accuracy_change(accuracy, "int8")
        if change is not None:
            reason += f"; held-out accuracy {100 * change:+.1f} points against fp32"
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
        self.compiled = core.compile_model(core.read_model(source), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.precision = precision
        self._lock = threading.Lock()

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

    For int8, ``graph`` is the quantized graph (:mod:`imgclf.inference.quantize`).
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
    precision: str = "auto",
    *,
    threads: int | None = None,
    images: int | None = None,
):
    """An engine computing the torch ``module`` on preprocessed (N, 3, size, size) arrays.

    ``engine`` is a name (chosen here with ``precision``) or a choice already made.
    int8 needs a calibrated graph, which a bare module does not have: the
    frozen backbone is run at fp32 then (training extracts features before
    the int8 model exists). The engine's ``choice`` says what runs.
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
