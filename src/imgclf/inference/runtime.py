"""Torch-free prediction from an exported ONNX model.

Needs only onnxruntime (or OpenVINO), numpy and Pillow (``pip install
'imgclf[runtime]'``): importing this module never imports torch, nor OpenVINO
unless it runs the model. The ONNX file carries its labels and preprocessing in
its metadata, so the file alone is enough. A file exported with ``--precision
int8`` is the model's calibrated int8 graph (metadata ``precision: int8``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from imgclf.errors import ModelFileError, OptionError
from imgclf.inference.metadata import parse_metadata, preprocessing_of
from imgclf.inference.predictor import Predictor, short_list
from imgclf.nets.engines import EngineChoice, OnnxSession, choose_engine, open_engine

METADATA_KEY = "imgclf"
#: What an old exported file says, once, about the ``known`` it cannot give.
NO_DETECTOR = ("has no unknown-input detector (it was exported from a model trained before imgclf had one): its "
               "predictions carry known: null; train and export it again to get one")  # fmt: skip


class OnnxClassifier(Predictor):
    """An exported imgclf model run by ONNX Runtime or OpenVINO; same API as ImageClassifier.

    A model exported with test-time augmentation averages each image with its
    mirror image inside the graph, so nothing here needs to know about it.
    """

    def __init__(self, session: OnnxSession, config: dict[str, Any], path: str = "<memory>"):
        self.session = session  # an engine of imgclf.nets.engines (ONNX Runtime or OpenVINO)
        self.config = config
        self.path = path
        self.labels = list(config["labels"])
        self.classes_ = self.labels
        self.arch = config.get("arch", "unknown")
        self.tta = bool(config.get("tta", False))
        self.preprocessing = preprocessing_of(config)
        self.info = {k: v for k, v in config.items() if k not in ("labels", "preprocessing")}
        # the graph computes the unknown score as its second output where the metadata has the threshold
        self.scores_unknown = config.get("unknown") is not None and session.signature().outputs > 1
        thresholds = (config.get("multilabel") or {}).get("thresholds")  # a sigmoid graph: a set of labels
        self.thresholds = None if thresholds is None else [float(t) for t in thresholds]

    @property
    def unknown_threshold(self) -> float | None:
        unknown = self.config.get("unknown")
        return None if unknown is None or not self.scores_unknown else float(unknown["threshold"])

    def _outputs(self, arrays: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if not self.scores_unknown:
            return self.session(arrays), None
        probs, scores = self.session.outputs(arrays)[:2]
        return probs, scores.reshape(-1)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (joblib, multiprocessing, a deepcopy) as the graph's bytes and the engine chosen:
        the engine's session is native, so it is opened again on unpickling, as it was."""
        state = self.__dict__.copy()
        session = state.pop("session")
        try:
            state["_graph"] = Path(self.path).read_bytes()
        except OSError as e:
            raise ModelFileError(f"{self.path}: cannot pickle the model: its ONNX file cannot be read "
                                 f"({e.strerror or e})") from None  # fmt: skip
        state["_choice"] = session.choice
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        graph, choice = state.pop("_graph"), state.pop("_choice")
        self.__dict__.update(state)
        self.session = open_engine(choice, graph, self.threads)
        self.session.choice = choice

    def why_not_explainable(self) -> str | None:
        """None where the graph has the class maps output (exported since imgclf has explanations)."""
        if self.config.get("explain") is None or self.session.signature().outputs < 2:
            return "the file has no class_maps output (it was exported before imgclf had explanations); export it again"
        return None

    def _explained(self, arrays: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Probabilities, unknown scores and class maps: the graph's first, second and last outputs."""
        why = self.why_not_explainable()
        if why is not None:
            from imgclf.errors import NotExplainableError

            raise NotExplainableError(f"{self.path}: cannot explain its predictions: {why}")
        outputs = self.session.outputs(arrays)
        return outputs[0], outputs[1].reshape(-1) if self.scores_unknown else None, outputs[-1]

    def engine_choice(self, images: int | None = None) -> EngineChoice:
        """The engine and precision running this file (chosen when it was loaded)."""
        choice = getattr(self.session, "choice", None)
        return choice or EngineChoice(self.session.name, getattr(self.session, "precision", "fp32"), "given")

    def __repr__(self) -> str:
        return (f"OnnxClassifier({self.path!r}, arch={self.arch!r}, labels={short_list(self.labels)}, "
                f"input_size={self.preprocessing.input_size}, tta={self.tta})")  # fmt: skip


def _check_graph(path: Path, session: OnnxSession, config: dict[str, Any]) -> None:
    """The graph's input and output agree with the metadata, and it runs on one image."""
    size, n_labels = config["preprocessing"]["input_size"], len(config["labels"])
    height, width = config["preprocessing"].get("input_shape") or (size, size)
    signature = session.signature()
    if signature.inputs != 1:
        raise ModelFileError(
            f"{path}: the ONNX graph takes {signature.inputs} inputs; an imgclf model takes one image batch"
        )
    shape = ["?" if d is None else d for d in signature.input_shape]
    wanted = [None, 3, height, width]
    if len(shape) != 4 or any(isinstance(d, int) and w is not None and d != w for d, w in zip(shape, wanted)):
        raise ModelFileError(f"{path}: the ONNX input is {shape} but its metadata says (N, 3, {height}, {width}); "
                             "the file was altered after export")  # fmt: skip
    if not signature.input_float32:
        raise ModelFileError(f"{path}: the ONNX input is {signature.input_type}, not float32")
    if signature.classes is not None and signature.classes != n_labels:
        raise ModelFileError(f"{path}: ONNX output has {signature.classes} classes but metadata names {n_labels}")
    if config.get("unknown") is not None and signature.outputs < 2:
        raise ModelFileError(f"{path}: the metadata names an unknown-input detector but the ONNX graph has no "
                             "unknown_score output; the file was altered after export")  # fmt: skip
    try:
        probe = session(np.zeros((1, 3, height, width), np.float32))
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ModelFileError(f"{path}: the ONNX graph fails on a {width}x{height} image ({first})") from None
    if probe.shape != (1, n_labels) or not np.isfinite(probe).all():
        raise ModelFileError(f"{path}: the ONNX graph gives {tuple(probe.shape)} for one image, not "
                             f"(1, {n_labels}) finite probabilities")  # fmt: skip


def load_onnx_model(
    path: str | Path,
    threads: int | None = None,
    *,
    engine: str = "auto",
    precision: str = "auto",
    images: int | None = None,
) -> OnnxClassifier:
    """Load an ONNX file exported by imgclf; checks its metadata and that its graph fits it.

    ``threads``: the engine's threads (default: the CPUs, at most 8). ``engine``
    (auto, onnxruntime, openvino) and ``precision`` (auto, fp32, bf16, int8) are
    decided by :func:`imgclf.nets.engines.choose_engine`; an int8 export runs at int8.
    ``images``: how many images the job has, if known (a small one stays on ONNX Runtime).
    """
    from imgclf.data.uris import local_model_file
    from imgclf.filetypes import sniff

    path = local_model_file(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: ONNX model file not found")
    kind = sniff(path)
    if kind == "empty":
        raise ModelFileError(f"{path}: not a readable ONNX model (the file is empty, 0 bytes)")
    config = _read_metadata(path)
    accuracy = config.get("precision_metrics")
    if config.get("precision") == "int8":
        if precision not in ("auto", "int8"):
            raise OptionError(f"{path}: is an int8 export and runs at int8 only; export the model again without "
                              f"--precision int8 to run it at {precision}")  # fmt: skip
        choice = choose_engine(engine, "int8", images=images, accuracy=accuracy, onnx_file=True, int8_ready=True)
        if precision == "auto":
            choice = EngineChoice(choice.engine, "int8", "the file is an int8 export", choice.cpu)
    elif config.get("quantized") == "int8":  # export --quantize int8: weights stored as int8, run as they are
        if precision not in ("auto", "int8"):
            raise OptionError(f"{path}: was exported with --quantize int8 and runs as it is; export the model again "
                              f"without --quantize to run it at {precision}")  # fmt: skip
        choice = choose_engine(engine, "fp32", images=images, onnx_file=True)
        choice = EngineChoice(choice.engine, "int8", "its weights were quantized by export --quantize int8",
                              choice.cpu)  # fmt: skip
    else:
        choice = choose_engine(engine, precision, images=images, accuracy=accuracy, onnx_file=True,
                               multilabel=config.get("multilabel") is not None)  # fmt: skip
    try:
        session = open_engine(choice, path, threads)
    except Exception as e:  # both engines raise one exception type per failure (Fail, InvalidProtobuf, ...)
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ModelFileError(f"{path}: not a readable ONNX model ({first})") from None
    session.choice = choice
    _check_graph(path, session, config)
    model = OnnxClassifier(session, config, str(path))
    model.threads = threads
    if not model.scores_unknown:
        import warnings

        warnings.warn(f"{path}: {NO_DETECTOR}", stacklevel=2)
    return model


def _read_metadata(path: Path) -> dict[str, Any]:
    """The file's imgclf metadata, checked, read before any engine is built (the
    precision the file was exported at decides which engine runs it)."""
    try:
        props = onnx_metadata(path)
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read ONNX model ({e.strerror or e})") from None
    except ValueError as e:
        raise ModelFileError(f"{path}: not a readable ONNX model ({e})") from None
    raw = props.get(METADATA_KEY)
    if raw is None:
        raise ModelFileError(f"{path}: ONNX file has no imgclf metadata (labels, preprocessing); export it with "
                             "'imgclf export'")  # fmt: skip
    return parse_metadata(raw, path, "onnx")


def onnx_metadata(path: Path) -> dict[str, str]:
    """An ONNX file's ``metadata_props``, read straight from the protobuf's top level
    (field 14 of ModelProto), skipping the graph: no onnx package, no engine.
    Raises ValueError where the bytes are not a well-formed protobuf."""
    import mmap

    def varint(buf, i: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            if i >= len(buf) or shift > 63:
                raise ValueError("truncated or malformed protobuf")
            byte = buf[i]
            value |= (byte & 0x7F) << shift
            i, shift = i + 1, shift + 7
            if byte < 0x80:
                return value, i

    def fields(buf, start: int, end: int):
        i = start
        while i < end:
            tag, i = varint(buf, i)
            kind = tag & 7
            if kind == 0:
                value, i = varint(buf, i)
                yield tag >> 3, value
            elif kind == 2:
                size, i = varint(buf, i)
                if i + size > end:
                    raise ValueError("a field runs past the end of the file")
                yield tag >> 3, (i, i + size)
                i += size
            elif kind in (1, 5):
                i += 8 if kind == 1 else 4
            else:
                raise ValueError(f"unexpected protobuf wire type {kind}")

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        props = {}
        for number, value in fields(buf, 0, len(buf)):
            if number == 14 and isinstance(value, tuple):
                entry = {n: bytes(buf[v[0] : v[1]]).decode("utf-8", "replace")
                         for n, v in fields(buf, *value) if isinstance(v, tuple)}  # fmt: skip
                props[entry.get(1, "")] = entry.get(2, "")
        return props
