"""Which engine runs the network, at which precision: one table, one choice.

Every path that runs the network (feature extraction in training, ``predict``,
``evaluate``, batch scoring here and in Ray actors and Spark executors, ``serve``)
asks :func:`choose_engine`, and nothing else decides. What each engine can do is
data in :data:`ENGINES`; which one ``auto`` prefers at each precision is
:data:`AUTO_ORDER`, set by measurement (``benchmarks/throughput.py``, docs
"Engines and precision"):

- fp32 on a CPU: ONNX Runtime (eager PyTorch for a job of a few images on a torch
  model: no graph to build). They compute the same fp32 network: answers agree to 1e-4.
- bf16: OpenVINO, only where the CPU multiplies bf16 natively (:mod:`imgclf.nets.cpu`).
- int8 (the model's calibrated static QDQ graph, :mod:`imgclf.inference.precision`): OpenVINO.
- GPUs: eager PyTorch.

One model, one answer: the precision depends on the model file, this CPU's
capabilities and the options given, never on how many images a job has, so the
same image gets the same answer from every path. ``precision="auto"`` takes a
lossy precision only where the model file carries a certificate for it measured
on a CPU like this one (:func:`certificate_verdict`): top labels equal to fp32 on
at least 99% of at least :data:`CERTIFY_MIN_IMAGES` images the head was not fitted
on, held-out accuracy within half a point. bf16 is tried first (closer to fp32 and,
where native, faster), then int8; otherwise fp32, and the reason is one line.
OpenVINO is imported only when it runs.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf.errors import MissingDependencyError, OptionError
from imgclf.nets.cpu import CpuCapabilities, cpu_capabilities, cpu_name
from imgclf.options import ENGINE_NAMES as ENGINE_NAMES  # the names live in imgclf.options (numpy-free)
from imgclf.options import LOSSY_PRECISIONS as LOSSY_PRECISIONS
from imgclf.options import NETWORK, install_hint, option_error, validate
from imgclf.options import PRECISIONS as PRECISIONS


@dataclass(frozen=True)
class EngineSpec:
    """What one engine needs and can do."""

    name: str
    module: str  # the import it needs
    extra: str  # the install extra that brings it (imgclf.options.install_hint)
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
# ENGINE_NAMES, PRECISIONS, LOSSY_PRECISIONS: imgclf.options (numpy-free, for --help); "auto" and this table's
# names, checked by tests/test_options.py

#: Which engine ``auto`` takes at each precision on a CPU, fastest first (measured).
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "fp32": ("onnxruntime", "openvino", "torch"),
    "bf16": ("openvino",),
    "int8": ("openvino", "onnxruntime"),
}

#: Below this many images a torch model runs eagerly at fp32 (no graph to build);
#: both engines compute the same fp32 network, so only the speed differs.
EAGER_MAX_IMAGES = 8

#: What a certificate needs before ``auto`` takes a lossy precision: this many images the
#: head was not fitted on (with 0 flips in 300 the 95% upper bound on the flip rate is 1%),
CERTIFY_MIN_IMAGES = 300
#: top labels equal to fp32 on at least this share of them,
AGREEMENT_MINIMUM = 0.99
#: and accuracy (on those with labels) within this much of fp32's.
ACCURACY_TOLERANCE = 0.005


@dataclass(frozen=True)
class EngineChoice:
    """The engine and precision that will run the network, and why (one line)."""

    engine: str
    precision: str
    reason: str
    cpu: str = ""  # the capabilities that chose it (imgclf.nets.cpu), e.g. "bf16+vnni" or "none"

    def describe(self) -> str:
        return f"engine {self.engine}, {self.precision} ({self.reason})"

    def to_dict(self) -> dict:
        """What ran, as every output records it (--json, results metadata, /v1/model, the report):
        enough to reproduce an answer (the same model file, engine and precision on a CPU of
        these capabilities gives the same probabilities to 1e-4)."""
        return {"engine": self.engine, "precision": self.precision, "cpu": self.cpu}


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


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (:func:`imgclf.nets.cpu.cpu_capabilities`)."""
    return cpu_capabilities().bf16


def certificate_verdict(metrics: dict | None, precision: str, caps: CpuCapabilities) -> tuple[bool, str]:
    """Whether the model's recorded measurements let ``auto`` take ``precision`` on a CPU
    with ``caps``, and why (short). ``metrics``: the model's ``precision_metrics``."""
    entry = (metrics or {}).get(precision) if isinstance(metrics, dict) else None
    if not isinstance(entry, dict) or entry.get("top_label_agreement") is None:
        return False, f"{precision} not certified for this model"
    images = int(entry.get("images") or 0)
    unseen = int(entry.get("unseen_images") or 0)
    recorded = str(entry.get("cpu") or "")
    if unseen < CERTIFY_MIN_IMAGES:
        return False, (f"{precision} measured on {unseen} images the head did not see ({images} in all): too few "
                       f"to certify (needs {CERTIFY_MIN_IMAGES})")  # fmt: skip
    if precision == "bf16" and "bf16" not in recorded.split("+"):
        return False, f"bf16 was not measured on a CPU with native bf16 (recorded: {recorded or 'unknown'})"
    if precision == "int8" and ("vnni" in recorded.split("+")) != caps.vnni:
        return False, f"int8 was measured on a CPU {'with' if not caps.vnni else 'without'} VNNI, not one like this"
    agreement = float(entry["top_label_agreement"])
    said = f"top labels {100 * agreement:.1f}% equal to fp32 on {unseen} unseen images"
    change = entry.get("accuracy_change")
    if change is not None:
        said += f", accuracy {100 * float(change):+.1f} points"
    if agreement < AGREEMENT_MINIMUM:
        return False, f"{precision} not taken: {said} (needs {100 * AGREEMENT_MINIMUM:.0f}%)"
    if change is not None and abs(float(change)) > ACCURACY_TOLERANCE + 1e-9:
        return False, f"{precision} not taken: {said} (needs within {100 * ACCURACY_TOLERANCE:.1f})"
    return True, f"certified: {said}"


def _auto_precision(engine: str, metrics: dict | None, int8_ready: bool, caps: CpuCapabilities) -> tuple[str, str]:
    """bf16, int8 or fp32 for ``precision="auto"``, with the reason. Never depends on the job's size."""
    if engine not in ("auto", "openvino"):
        return "fp32", f"{engine} runs fp32"
    notes = []
    if not caps.bf16:
        notes.append("no native bf16")
    elif not installed("openvino"):
        notes.append(f"bf16 needs OpenVINO: {install_hint('openvino')}")
    else:
        ok, said = certificate_verdict(metrics, "bf16", caps)
        if ok:
            return "bf16", f"native bf16, {said}"
        notes.append(said)
    if int8_ready:
        if not installed("openvino"):
            notes.append(f"int8 needs OpenVINO: {install_hint('openvino')}")
        else:
            ok, said = certificate_verdict(metrics, "int8", caps)
            if ok:
                return "int8", "; ".join([*notes, f"calibrated int8 graph, {said}"])
            notes.append(said)
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
    multilabel: bool = False,
) -> EngineChoice:
    """The one place that decides which engine runs the network, at which precision.

    ``images``: how many images the job has, if known: it may pick between engines
    computing the same precision (a few images on a torch model run eagerly), never
    between precisions. ``accuracy``: the model's ``precision_metrics`` (the
    certificates ``auto`` needs for a lossy precision); ``onnx_file``: the network is
    an exported file, so torch cannot run it; ``int8_ready``: the model carries a
    calibrated int8 graph (or is one); ``multilabel``: a multi-label model, which runs at fp32
    alone for now (nothing certifies its sets at bf16 or int8). Raises :class:`OptionError` for a combination
    that cannot run and :class:`MissingDependencyError` (naming the extra) for an
    engine not installed.
    """
    validate(NETWORK, {"device": device, "engine": engine, "precision": precision})
    if multilabel:
        refuse_lossy_multilabel(precision)
    caps = cpu_capabilities()
    if device != "cpu":
        if engine not in ("auto", "torch") or precision not in ("auto", "fp32"):
            raise option_error("device", "on {given} the network runs on torch in fp32; use {device} cpu for "
                               "{engine} {e} {precision} {p}", given=device, e=engine, p=precision)  # fmt: skip
        return EngineChoice("torch", "fp32", f"{device}: eager PyTorch", caps.key)
    if engine == "torch" and onnx_file:
        raise OptionError("an exported ONNX file runs on onnxruntime or openvino, not torch; load the .imgclf model")
    reason = "asked for"
    if precision == "auto":
        precision, reason = _auto_precision(engine, accuracy, int8_ready, caps)
    elif precision == "bf16" and not caps.bf16:
        raise OptionError(f"this CPU ({cpu_name()}) has no native bf16 ({caps.source}), so bf16 would run as fp32; "
                          "use --precision fp32 or auto")  # fmt: skip
    elif precision == "int8":
        if not int8_ready:
            raise OptionError("this ONNX file is not an int8 export: export the .imgclf model (trained with "
                              "--precision int8) again with 'imgclf export MODEL --precision int8'" if onnx_file else
                              "this model has no calibrated int8 graph: train it with --precision int8 "
                              "(calibrated on its training images), or call imgclf.calibrate_int8(model, images)")  # fmt: skip
        if certificate_verdict(accuracy, "int8", caps)[0]:
            reason += "; " + certificate_verdict(accuracy, "int8", caps)[1]
    if engine == "auto":
        if precision == "fp32" and not onnx_file and images is not None and images < EAGER_MAX_IMAGES:
            return EngineChoice("torch", "fp32", f"{reason}; {images} image(s): eager PyTorch, no graph to build",
                                caps.key)  # fmt: skip
        usable = [n for n in AUTO_ORDER[precision] if _runs(n, onnx_file)]
        if not usable:
            needed = [ENGINES[n] for n in AUTO_ORDER[precision] if ENGINES[n].runs_onnx_files or not onnx_file]
            raise MissingDependencyError(f"{precision} needs {' or '.join(s.name for s in needed)}: "
                                         f"{install_hint(needed[0].extra)}")  # fmt: skip
        return EngineChoice(usable[0], precision, reason, caps.key)
    spec = ENGINES[engine]
    if not installed(engine):
        raise MissingDependencyError(f"--engine {engine} needs {spec.module}: {install_hint(spec.extra)}")
    if not _runs(engine, onnx_file):
        raise MissingDependencyError(f"--engine {engine} on a torch model needs onnx: {install_hint('export')}")
    check_engine_runs(engine, precision)
    return EngineChoice(engine, precision, reason, caps.key)


def refuse_lossy_multilabel(precision: str) -> None:
    """A multi-label model runs at fp32 alone for now: bf16 or int8 asked for is one line."""
    if precision in ("bf16", "int8"):
        raise option_error("precision", f"{{precision}} {precision}: multi-label models run at fp32 only for "
                                        "now (nothing certifies their sets at bf16 or int8); use {precision} auto "
                                        "or fp32")  # fmt: skip


def check_engine_runs(engine: str, precision: str) -> None:
    """Refuse an engine named with a precision it does not run (``auto`` on either side: any),
    in the same words wherever they are given together (``predict``, ``train``, ``serve``)."""
    spec = ENGINES.get(engine)
    if spec is not None and precision != "auto" and precision not in spec.precisions:
        raise OptionError(f"--engine {engine} runs {', '.join(spec.precisions)}, not {precision}", "engine")


# ---- the engines: a float32 (N, 3, H, W) batch in (the square or a rectangle), the first output out ----


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError(f"ONNX prediction needs onnxruntime: {install_hint('runtime')}") from None
    return onnxruntime


def _openvino():
    try:
        import openvino
    except ImportError:
        raise MissingDependencyError(f"--engine openvino needs OpenVINO: {install_hint('openvino')}") from None
    return openvino


def default_threads() -> int:
    return min(os.cpu_count() or 1, 8)


class OnnxSession:
    """An ONNX Runtime session on the CPU: float32 batch in, first output out."""

    name = "onnxruntime"

    def __init__(self, model: bytes | str | Path, threads: int | None = None, precision: str = "fp32",
                 initializers: dict[str, np.ndarray] | None = None):  # fmt: skip
        """``initializers``: tensors for a graph whose weights are external (a graph template,
        :mod:`imgclf.nets.templates`), by initializer name."""
        ort = _ort()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or default_threads()
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if initializers:
            self._initializers = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in initializers.values()]
            options.add_external_initializers(list(initializers), self._initializers)  # kept alive with the session
        source = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.precision = precision

    def __call__(self, arrays: np.ndarray) -> np.ndarray:
        return self.outputs(arrays)[0]

    def outputs(self, arrays: np.ndarray) -> list[np.ndarray]:
        """Every output of the graph (an exported model's second is its unknown score)."""
        return self.session.run(None, {self.input_name: np.ascontiguousarray(arrays, dtype=np.float32)})

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
            outputs=len(outputs),
        )


@dataclass(frozen=True)
class Signature:
    """What a compiled graph takes and gives, for checking a model file against its metadata."""

    inputs: int
    input_shape: list[int | None]  # None: a dynamic axis
    input_float32: bool
    input_type: str
    classes: int | None  # the output's last axis, None where dynamic
    outputs: int = 1  # an exported model with an unknown-input detector has two


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
            len(inputs), shape, kind == "f32", kind, last.get_length() if last and last.is_static else None,
            len(outputs),
        )

    def __call__(self, arrays: np.ndarray) -> np.ndarray:
        return self.outputs(arrays)[0]

    def outputs(self, arrays: np.ndarray) -> list[np.ndarray]:
        """Every output of the graph (an exported model's second is its unknown score)."""
        with self._lock:
            result = self.request.infer({0: np.ascontiguousarray(arrays, dtype=np.float32)})
            return [np.array(result[i], copy=True) for i in range(len(self.compiled.outputs))]  # buffers are reused


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
    input_size: int | tuple[int, int],
    device: str = "cpu",
    engine: str | EngineChoice = "auto",
    precision: str = "fp32",
    *,
    threads: int | None = None,
    images: int | None = None,
):
    """An engine computing the torch ``module`` on preprocessed (N, 3, height, width) arrays
    (``input_size``: a square's side or (height, width)).

    ``engine`` is a name (chosen here with ``precision``) or a choice already made.
    Training extracts its features at fp32 (the default), so the feature cache
    never mixes precisions. int8 needs a calibrated graph, which a bare module
    does not have: the module runs at fp32 then. The engine's ``choice`` says what runs.
    """
    if isinstance(engine, EngineChoice):
        choice = engine
    else:
        choice = choose_engine(engine, "fp32" if precision in ("int8", "auto") else precision, device=device,
                               images=images)  # fmt: skip
    if choice.engine == "torch":
        built = TorchEngine(module, device)
    else:
        from imgclf.nets.onnx_graph import to_onnx_bytes

        built = open_engine(choice, to_onnx_bytes(module, input_size), threads)
    built.choice = choice
    return built
