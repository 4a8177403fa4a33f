"""Export a trained model to ONNX: the portable, native model.

The whole network (backbone, head, softmax) becomes one graph with a dynamic
batch axis. Labels, architecture and preprocessing go into the ONNX metadata
(key ``imgclf``), so the file alone is enough to use the model from any
language. Input: float32 NCHW ``(N, 3, S, S)`` (``(N, 3, H, W)`` for a whole-frame
``input_shape``), RGB, resized and centre-cropped as the metadata says, then
``(pixel / 255 - mean) / std``.
Output ``probabilities``: float32 ``(N, classes)``, in metadata label order. A model with an
unknown-input detector (:mod:`imgclf.inference.unknown`) has a second output,
``unknown_score``: float32 ``(N,)``, computed in the graph from the same pooled features
against the training features it carries; the metadata's ``unknown.threshold`` says
which scores are ``known: false``, so any runtime in any language can tell. A model whose
network ends in global average pooling (every built-in architecture) has a last output,
``class_maps``: float32 ``(N, classes, h, w)``, the class activation maps of the crop
(:mod:`imgclf.inference.explain`); the metadata's ``explain`` says so.

A model trained with test-time augmentation (``tta``) is exported with the
flip-average in the graph: each image and its mirror image go through the
network as one batch and their probabilities are averaged, exactly as the
torch model predicts, so every runtime that loads the file gets the same answer.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from imgclf.atomic import atomic_path
from imgclf.data.imaging import Preprocessing
from imgclf.errors import ModelFileError, OptionError
from imgclf.inference.explain import MAPS_OUTPUT, METHOD
from imgclf.inference.metadata import without_non_finite
from imgclf.inference.runtime import METADATA_KEY
from imgclf.inference.unknown import SCORE_OUTPUT
from imgclf.options import option_error, validate

INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"


class Exportable(Protocol):
    """What export reads from a model: an :class:`imgclf.inference.model.ImageClassifier`.

    Named here rather than imported, so that this module and the model (whose
    ``export_onnx`` calls :func:`export_onnx`) do not import each other.
    """

    labels: list[str]
    arch: str
    timm_name: str
    preprocessing: Preprocessing
    tta: bool
    info: dict[str, Any]
    int8_graph_: bytes | None
    unknown_: Any

    def scored_network(self, tta: bool | None = None, maps: bool = False) -> Any:
        """Backbone, head, softmax (flip-averaged with ``tta``), the unknown score and (``maps``)
        the class activation maps as one torch module."""

    def why_not_explainable(self) -> str | None:
        """None where class activation maps are exact for the network."""


def _multilabel(model: Exportable) -> bool:
    return getattr(model, "thresholds", None) is not None


def _multilabel_fields(model: Exportable) -> dict[str, Any]:
    """A multi-label model's metadata: its thresholds, and the format version an older imgclf
    refuses (the graph ends in a sigmoid, not a softmax)."""
    if not _multilabel(model):
        return {}
    from imgclf.inference.metadata import MULTILABEL_FORMAT_VERSION

    return {"multilabel": {"thresholds": list(model.thresholds)}, "format_version": MULTILABEL_FORMAT_VERSION}


@contextmanager
def _quiet_onnxruntime():
    """ONNX Runtime's quantizer logs dozens of warnings (tensors it leaves in float) to the root
    logger and to its C++ logger; they say nothing a user can act on."""
    import onnxruntime

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    onnxruntime.set_default_logger_severity(3)
    try:
        yield
    finally:
        logging.disable(previous)
        onnxruntime.set_default_logger_severity(2)


def default_export_path(model: str | Path) -> str | Path:
    """Beside the model, with ``.onnx`` for its suffix (a URI stays a URI)."""
    from imgclf.data.uris import is_remote

    if is_remote(model):
        text = str(model)
        head, _, tail = text.rpartition("/")
        return f"{head}/{tail.rsplit('.', 1)[0] if '.' in tail else tail}.onnx"
    return Path(model).with_suffix(".onnx")


def export_onnx(
    model: Exportable, path: str | Path, *, quantize: str | None = None, precision: str = "fp32"
) -> Path | str:
    """Write ``model`` as an ONNX file at ``path`` (atomically; a URI such as ``s3://...``
    is written locally first and uploaded whole); returns the path.

    ``quantize="int8"`` writes dynamically quantized int8 weights instead.
    ``precision="int8"`` writes the model's calibrated static int8 graph
    (``imgclf.inference.precision``), which runs 1.5 to 1.7x faster than fp32.
    """
    from imgclf.data.uris import as_local, filesystem, is_remote

    if not is_remote(path):
        return _export_local(model, as_local(path), quantize=quantize, precision=precision)
    import tempfile

    fs, bare = filesystem(str(path))
    with tempfile.TemporaryDirectory(prefix="imgclf-export-") as tmp:
        local = _export_local(model, Path(tmp) / "model.onnx", quantize=quantize, precision=precision)
        try:
            fs.put_file(str(local), bare)
        except Exception as e:  # each filesystem raises its own types
            raise ModelFileError(f"{path}: cannot write the ONNX file ({type(e).__name__}: {e})") from None
    return str(path)


def scored_graph_bytes(model: Exportable) -> bytes:
    """The graph :func:`export_onnx` writes, without its metadata: the probabilities, with a
    detector the unknown score, and the class maps where they are exact. A ``.imgclf`` model at
    bf16 runs these very bytes (:meth:`ImageClassifier._engine_for`): at bf16 the rounding
    follows the graph, so the file and its export give the same answer only from the same one."""
    from imgclf.nets.onnx_graph import to_onnx_bytes

    explainable = model.why_not_explainable() is None
    network = model.scored_network(maps=explainable).cpu()
    outputs = ((OUTPUT_NAME,) + (() if model.unknown_ is None else (SCORE_OUTPUT,))
               + ((MAPS_OUTPUT,) if explainable else ()))  # fmt: skip
    return to_onnx_bytes(network, model.preprocessing.shape, input_name=INPUT_NAME, output_name=outputs)


def _export_local(model: Exportable, path: str | Path, *, quantize: str | None = None, precision: str = "fp32") -> Path:
    """Write ``model`` as an ONNX file at ``path`` (atomically); returns the path.

    ``quantize="int8"`` writes dynamically quantized int8 weights instead.
    ``precision="int8"`` writes the model's calibrated static int8 graph
    (``imgclf.inference.precision``), which runs 1.5 to 1.7x faster than fp32.
    """
    import onnx

    from imgclf.atomic import check_output_path
    from imgclf.nets.engines import refuse_lossy_multilabel
    from imgclf.nets.onnx_graph import DEFAULT_OPSET

    validate("export", {"quantize": quantize, "precision": precision})
    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"{path}: is a folder; give a file name ending in .onnx")
    check_output_path(path, "ONNX file", model="onnx")  # an image or notes typed as the name are kept
    if getattr(model, "thresholds", None) is not None:
        refuse_lossy_multilabel(precision)
    if precision == "int8":
        if quantize:
            raise option_error("quantize", "{quantize} and {precision} int8 both quantize; give one ({precision} "
                                           "int8 is calibrated)")  # fmt: skip
        if model.int8_graph_ is None:
            raise OptionError("this model has no calibrated int8 graph: train it with --precision int8, "
                              "or call imgclf.calibrate_int8(model, training_images) and save it")  # fmt: skip
        graph = onnx.load_from_string(model.int8_graph_)
        config = json.loads({p.key: p.value for p in graph.metadata_props}[METADATA_KEY])
        config.update(metrics=model.info.get("metrics"), precision_metrics=model.info.get("precision_metrics"))
        del graph.metadata_props[:]
        entry = graph.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(without_non_finite(config))
        with atomic_path(path, "ONNX file") as tmp:
            onnx.save(graph, tmp)
        return path
    explainable = model.why_not_explainable() is None
    graph = onnx.load_from_string(scored_graph_bytes(model))
    config = {
        "labels": model.labels,
        "arch": model.arch,
        "timm_name": model.timm_name,
        "preprocessing": model.preprocessing.to_dict(),
        "tta": bool(model.tta),  # the graph itself averages each image with its mirror image
        "input": {
            "name": INPUT_NAME,
            "layout": "NCHW",
            "dtype": "float32",
            "channels": "RGB",
            "range": "(pixel / 255 - mean) / std",
        },  # fmt: skip
        "output": {"name": OUTPUT_NAME, "meaning": "sigmoid probabilities, one per label, in label order (multi-label: "
                   "a label applies from its threshold)" if _multilabel(model) else "softmax probabilities in label order",
                   **({"unknown_score": f"second output {SCORE_OUTPUT}, (N,): known is unknown_score <= "
                                        "unknown.threshold"} if model.unknown_ is not None else {}),
                   **({"class_maps": f"last output {MAPS_OUTPUT}, (N, classes, h, w): the class activation map "
                                     "of each label on the centre crop"} if explainable else {})},
        **({"explain": {"method": METHOD, "output": MAPS_OUTPUT}} if explainable else {}),
        **({"unknown": model.unknown_.config()} if model.unknown_ is not None else {}),
        "metrics": model.info.get("metrics"),
        "precision": "fp32",
        # a certificate measured the network as trained: quantized weights are another network, not certified
        "precision_metrics": None if quantize else model.info.get("precision_metrics"),
        "versions": model.info.get("versions"),
        "opset": DEFAULT_OPSET,
        "quantized": quantize,
        **_multilabel_fields(model),
    }
    del graph.metadata_props[:]
    entry = graph.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(without_non_finite(config))
    graph.producer_name = "imgclf"
    graph.doc_string = f"imgclf image classifier ({model.arch}); labels: {', '.join(model.labels)}"
    with atomic_path(path, "ONNX file") as tmp:
        onnx.save(graph, tmp)
        if quantize == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            with _quiet_onnxruntime():
                quantize_dynamic(tmp, tmp, weight_type=QuantType.QUInt8)
            quantized = onnx.load(tmp)
            if not any(p.key == METADATA_KEY for p in quantized.metadata_props):
                quantized.metadata_props.extend(graph.metadata_props)
                onnx.save(quantized, tmp)
    return path
