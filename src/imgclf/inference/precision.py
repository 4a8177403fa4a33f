"""Precisions beyond fp32: the int8 model, where it is kept, and honest accuracy.

int8 is static post-training quantization with ONNX Runtime's quantizer: the
exported network becomes a QDQ graph (int8 weights per channel, uint8
activations whose ranges come from running the model's own training images
through it, MinMax). Measured against NNCF on the OpenVINO model (README,
Speed): the QDQ graph ran 1.7x faster under OpenVINO on this CPU where NNCF's ran
at fp32 speed, with the same held-out accuracy, and it needs no further package.
Calibrating takes seconds, so it is done once and kept in the workspace under
``engines/``, named by :func:`network_digest` (the weights, input size and
test-time augmentation), where both the ``.imgclf`` model and its exported
``.onnx`` file (which records the digest) find it.

:func:`measure_precisions` gives held-out metrics under each precision this
machine runs; training records them in the model file, and ``auto`` does not
take a precision whose accuracy moved by more than half a point.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from imgclf.atomic import atomic_path
from imgclf.data.images import ImageData
from imgclf.data.imaging import load_array
from imgclf.data.parallel import ordered_map
from imgclf.errors import DataError, ImageDecodeError, OptionError
from imgclf.inference.metrics import compute_metrics
from imgclf.nets.workspace import default_workspace, int8_model_file

if TYPE_CHECKING:
    from imgclf.inference.model import ImageClassifier
    from imgclf.inference.predictor import Predictor

#: Training images used to calibrate int8 (spread over the set); more moves MinMax ranges little.
CALIBRATION_IMAGES = 128
_DIGEST_VERSION = "imgclf-network-v1"


def network_digest(model: ImageClassifier) -> str:
    """SHA-256 of what the exported network computes: every tensor of the backbone
    and head, the input size and test-time augmentation. Metadata is left out, so
    the digest survives re-saving the model with new metrics."""
    import hashlib

    import torch

    digest = hashlib.sha256(f"{_DIGEST_VERSION}|{model.preprocessing.input_size}|tta={bool(model.tta)}".encode())
    for prefix, module in (("backbone.", model.backbone), ("head.", model.head)):
        for name, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().to("cpu").contiguous()
            digest.update(f"{prefix}{name}|{t.dtype}|{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def find_int8(digest: str | None, workspaces: Sequence[str | Path | None] = ()) -> Path | None:
    """The calibrated int8 graph of the network ``digest``, if one was made: looked for
    in ``workspaces``, then in the default workspace."""
    if not digest:
        return None
    for folder in (*[w for w in workspaces if w], default_workspace()):
        path = int8_model_file(folder, digest)
        if path.is_file():
            return path
    return None


def int8_missing(name: str) -> OptionError:
    """The error for an int8 request on a model that was never calibrated."""
    return OptionError(f"{name}: no int8 calibration of this model here; train it with --precision int8 (which "
                       "calibrates on its training images), or call imgclf.calibrate_int8(model, images)")  # fmt: skip


def _decode(images: Sequence[ImageData], preprocessing, workers: int | None = None):
    """Preprocessed arrays of the readable ``images`` and their indices."""

    def load(item):
        i, im = item
        try:
            return i, load_array(im.source, preprocessing, im.name)
        except ImageDecodeError:
            return i, None

    loaded = [(i, a) for i, a in ordered_map(load, enumerate(images), workers) if a is not None]
    if not loaded:
        raise DataError("none of the images could be read")
    return np.stack([a for _, a in loaded]), [i for i, _ in loaded]


@contextmanager
def _quiet_quantizer():
    """ONNX Runtime's quantizer logs a line per tensor it leaves in float; nothing to act on."""
    import onnxruntime

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    onnxruntime.set_default_logger_severity(3)
    try:
        yield
    finally:
        logging.disable(previous)
        onnxruntime.set_default_logger_severity(2)


def calibrate_int8(
    model: ImageClassifier,
    images: Sequence[ImageData],
    *,
    workspace: str | Path | None = None,
    limit: int = CALIBRATION_IMAGES,
) -> Path:
    """Quantize ``model`` to int8, calibrated on ``images`` (its training images), and
    keep the result in ``workspace`` (default: the default workspace); returns its path.

    The int8 file is a complete exported model (metadata included) whose graph
    is static QDQ: it runs on OpenVINO (fastest) or ONNX Runtime.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from imgclf.inference.export import export_onnx
    from imgclf.inference.runtime import METADATA_KEY

    if limit < 1:
        raise OptionError(f"limit must be at least 1, got {limit}")
    step = max(1, len(images) // limit)
    arrays, _ = _decode(list(images)[::step][:limit], model.preprocessing)

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": arrays[i : i + 16]} for i in range(0, len(arrays), 16)])

        def get_next(self):
            return next(self.batches, None)

    dest = int8_model_file(workspace or default_workspace(), network_digest(model))
    with tempfile.TemporaryDirectory(prefix="imgclf-int8-") as tmp:
        fp32, pre, int8 = Path(tmp, "fp32.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "int8.onnx")
        export_onnx(model, fp32)
        graph = onnx.load(str(fp32))
        config = json.loads({p.key: p.value for p in graph.metadata_props}[METADATA_KEY])
        with _quiet_quantizer():
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
            quantize_static(str(pre), str(int8), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                            calibrate_method=CalibrationMethod.MinMax, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8)  # fmt: skip
        quantized = onnx.load(str(int8))
        config.update(precision="int8", quantized="int8",
                      calibration={"images": len(arrays), "method": "static QDQ, MinMax, per-channel weights"})  # fmt: skip
        del quantized.metadata_props[:]
        entry = quantized.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(config)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dest, "int8 model") as out:
            onnx.save(quantized, out)
    return dest


def measure_precisions(
    model: Predictor, images: Sequence[ImageData], precisions: Sequence[str] | None = None
) -> dict[str, dict]:
    """Held-out metrics of ``model`` on labelled ``images`` under each precision.

    Default precisions: fp32, bf16 where this CPU has it natively, int8 where the
    model has been calibrated. Each entry has ``micro_accuracy``, ``macro_accuracy``,
    ``log_loss``, ``engine`` and ``images``; those other than fp32 also have
    ``top_label_agreement`` (share of images whose top label equals fp32's) and
    ``largest_probability_change``. The model's engine settings are restored after.
    """
    from imgclf.nets.engines import installed, native_bf16

    labelled = [im for im in images if im.label is not None]
    if not labelled:
        raise DataError("no labelled images to measure precisions on")
    if precisions is None:
        precisions = ["fp32"]
        if installed("openvino") and native_bf16():
            precisions.append("bf16")
        if model.int8_available():
            precisions.append("int8")
    arrays, kept = _decode(labelled, model.preprocessing)
    targets = [model.labels.index(labelled[i].label) for i in kept]
    saved = (model.engine, model.precision)
    results: dict[str, dict] = {}
    reference = None
    try:
        for precision in precisions:
            choice = model.use_engine("auto", precision)
            probs = model.predict_proba_arrays(arrays)
            metrics = compute_metrics(probs, targets, model.labels)
            entry = {"micro_accuracy": metrics.micro_accuracy, "macro_accuracy": metrics.macro_accuracy,
                     "log_loss": metrics.log_loss, "engine": choice.engine, "images": len(targets)}  # fmt: skip
            if reference is None:
                reference = probs
            else:
                entry["top_label_agreement"] = float((probs.argmax(1) == reference.argmax(1)).mean())
                entry["largest_probability_change"] = float(np.abs(probs - reference).max())
            results[precision] = entry
    finally:
        model.use_engine(*saved)
    return results
