"""Precisions beyond fp32: calibrating the int8 network, and honest held-out accuracy.

int8 is static post-training quantization with NNCF (OpenVINO's quantizer, ONNX
backend): the exported network becomes a QDQ ONNX graph, its activation ranges
measured by running the model's own training images through it, with NNCF's
fast bias correction. Measured against ONNX Runtime's quantizer on the flower
model (README, "Engines and precision"): both make OpenVINO 1.5 to 1.7x faster
than ONNX Runtime fp32, but NNCF's graph kept accuracy (97.5% -> 97.5%, top labels
equal on 99.5% of images) where ONNX Runtime's lost half a point (99.0%), even
with the stem and head left in float, and 2.5 points (97.0%) with them quantized.
With the stem convolution and head left in float (:func:`_kept_in_float`), NNCF's
graph agrees with fp32 on all 200 flowers.
NNCF's graph runs slowly on ONNX Runtime (0.4x fp32), so ``auto`` runs int8 on
OpenVINO only. Calibrating takes seconds, so it is done once, at training, and
the graph is kept in the model file (``int8.onnx``).

:func:`measure_precisions` gives held-out metrics under each precision this
machine runs; training records them in the model file (``precision_metrics``),
and ``precision="auto"`` takes a precision only where its accuracy stayed within
half a point of fp32 with top labels equal on at least 99% of the images.
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

from imgclf.data.images import ImageData
from imgclf.data.imaging import load_array
from imgclf.data.parallel import ordered_map
from imgclf.errors import DataError, ImageDecodeError, OptionError
from imgclf.inference.metrics import compute_metrics
from imgclf.options import install_hint

if TYPE_CHECKING:
    from imgclf.inference.model import ImageClassifier

#: Training images used to calibrate int8 (spread over the set); more moves the ranges little.
CALIBRATION_IMAGES = 128
#: ``precision="auto"`` calibrates int8 only from this many training images: fewer give
#: thin activation statistics (``precision="int8"`` calibrates on any number).
AUTO_CALIBRATION_MIN_IMAGES = 32
CALIBRATION_METHOD = "NNCF post-training quantization, static QDQ, fast bias correction"


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


#: A given image whose pooled features match a stored training row this closely (cosine) is
#: that training image: the stored rows are float16 copies of the same fp32 features
#: (measured 0.99999 and more for the same photo; 0.97 at most between the bundled flowers).
SAME_IMAGE_COSINE = 0.999


def unseen_images(model: ImageClassifier, images: Sequence[ImageData]) -> tuple[list[ImageData], str | None]:
    """``images`` less those a certificate must not count: repeated copies (the same bytes) and,
    where the model file keeps its training images' features, the images its head was fitted
    on. Returns them and a line saying what was left out (or that training images could not be
    told apart), None when nothing needs saying."""
    import hashlib

    kept, seen_bytes, copies = [], set(), 0
    for im in images:
        try:
            digest = hashlib.sha256(Path(im.source).read_bytes()).digest() if isinstance(im.source, (str, Path)) \
                else hashlib.sha256(bytes(im.source)).digest()  # fmt: skip
        except OSError:
            kept.append(im)  # unreadable: measuring says so
            continue
        if digest in seen_bytes:
            copies += 1
            continue
        seen_bytes.add(digest)
        kept.append(im)
    stored = model._stored_to_save(model.config())
    trained = stored.part(held_out=False)[0] if stored is not None else np.zeros((0, 0), np.float32)
    complete = stored is not None and stored.of_images == len(stored)
    fitted_on = 0
    if len(trained) and kept:
        arrays, readable = _decode(kept, model.preprocessing)
        features = _pooled_features(model, arrays)
        unit = trained / np.maximum(np.linalg.norm(trained, axis=1, keepdims=True), 1e-12)
        mine = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
        same = (mine @ unit.T).max(axis=1) >= SAME_IMAGE_COSINE
        drop = {readable[i] for i in np.flatnonzero(same)}
        fitted_on = len(drop)
        kept = [im for i, im in enumerate(kept) if i not in drop]
    said = []
    if fitted_on:
        said.append(f"{fitted_on} the model was trained on")
    if copies:
        said.append(f"{copies} repeated cop{'y' if copies == 1 else 'ies'} of another")
    line = f"left out {' and '.join(said)}: a certificate counts images the head never saw, once" if said else None
    if not complete:
        why = "keeps no training features" if stored is None else "keeps only some of its training features"
        line = (f"{line}; " if line else "") + (f"the model file {why}, so its training images cannot be told "
                                                 "apart: give only images it never saw")  # fmt: skip
    return kept, line


def _pooled_features(model: ImageClassifier, arrays: np.ndarray) -> np.ndarray:
    """The fp32 features the head sees (torch on the CPU), in batches."""
    import torch

    backbone = model.backbone.eval()
    with torch.no_grad():
        return np.concatenate([backbone(torch.from_numpy(arrays[k:k + 32]).to(model.device)).float().cpu().numpy()
                               for k in range(0, len(arrays), 32)])  # fmt: skip


@contextmanager
def _quiet_quantizer():
    """NNCF prints progress bars and notes to stdout and logs; none of it is for the user."""
    import contextlib
    import io

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def int8_calibration_available() -> bool:
    """Whether NNCF (``pip install 'imgclf[openvino]'``) is here to calibrate int8."""
    import importlib.util

    return importlib.util.find_spec("nncf") is not None and importlib.util.find_spec("onnx") is not None


def _kept_in_float(graph):
    """The stem convolution (it sees raw pixels, 3 channels) and the head (a few thousand
    weights) stay float: together about 3% of the work, most of the int8 error."""
    import nncf

    convs = [n.name for n in graph.graph.node if n.op_type == "Conv"]
    return nncf.IgnoredScope(names=convs[:1], types=["Gemm", "MatMul", "Softmax"], validate=False)


def _refuse_multilabel(model) -> None:
    if getattr(model, "multilabel", False):
        raise OptionError("a multi-label model runs at fp32: bf16 and int8 are certified for single-label models "
                          "only for now")  # fmt: skip


def calibrate_int8(model: ImageClassifier, images: Sequence[ImageData], *, limit: int = CALIBRATION_IMAGES) -> bytes:
    """Quantize ``model`` to int8, calibrated on ``images`` (its training images), and
    keep the graph in the model (``model.int8_graph_``, saved with it); returns it.
    A multi-label model is refused: its precisions are not certified yet.

    The graph is the complete exported network (head, softmax, test-time
    augmentation, metadata with ``precision: int8``) as a static QDQ graph: it
    runs on OpenVINO (fast) or ONNX Runtime (slow), and ``imgclf export
    --precision int8`` writes it as it is.
    """
    from imgclf.errors import MissingDependencyError

    _refuse_multilabel(model)
    if not int8_calibration_available():
        raise MissingDependencyError(f"calibrating int8 needs NNCF: {install_hint('openvino')}")
    import onnx

    from imgclf.inference.export import export_onnx
    from imgclf.inference.runtime import METADATA_KEY

    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise OptionError(f"limit must be a positive integer, got {limit!r}")
    images = list(images)
    if not images:
        raise DataError("no images to calibrate int8 on; give the model's training images")
    step = max(1, len(images) // limit)
    arrays, _ = _decode(images[::step][:limit], model.preprocessing)

    with tempfile.TemporaryDirectory(prefix="imgclf-int8-") as tmp:
        fp32 = Path(tmp, "fp32.onnx")
        export_onnx(model, fp32)
        graph = onnx.load(str(fp32))
    config = json.loads({p.key: p.value for p in graph.metadata_props}[METADATA_KEY])
    with _quiet_quantizer():
        import nncf

        dataset = nncf.Dataset([{graph.graph.input[0].name: a[None]} for a in arrays])
        quantized = nncf.quantize(graph, dataset, subset_size=len(arrays), ignored_scope=_kept_in_float(graph))
    config.update(precision="int8", calibration={"images": len(arrays), "method": CALIBRATION_METHOD})
    del quantized.metadata_props[:]
    entry = quantized.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(config)
    model.int8_graph_ = quantized.SerializeToString()
    model.info["calibration"] = config["calibration"]
    model.features_engine = None  # the next batch goes through choose_engine again
    return model.int8_graph_


def available_precisions(model) -> list[str]:
    """The precisions ``model`` can run here: fp32; bf16 where the CPU has it natively
    (and OpenVINO is installed); int8 where the model carries a calibrated graph."""
    from imgclf.nets.cpu import cpu_capabilities
    from imgclf.nets.engines import installed

    found = ["fp32"]
    if getattr(model, "device", "cpu") == "cpu" and installed("openvino") and cpu_capabilities().bf16:
        found.append("bf16")
    if getattr(model, "int8_graph_", None) is not None:
        found.append("int8")
    return found


def compare_to_fp32(reference: np.ndarray, probs: np.ndarray, targets: Sequence[int] | None, unseen: int) -> dict:
    """A certificate entry for one lossy precision: how its answers compare with fp32's
    on the same images (``targets``: their label indices where known, else None;
    ``unseen``: how many of them the head was not fitted on)."""
    from imgclf.nets.cpu import cpu_capabilities

    entry = {
        "images": int(len(probs)),
        "unseen_images": int(unseen),
        "top_label_agreement": float((probs.argmax(1) == reference.argmax(1)).mean()) if len(probs) else 0.0,
        "largest_probability_change": float(np.abs(probs - reference).max()) if len(probs) else 0.0,
        "cpu": cpu_capabilities().key,
    }
    if targets is not None and len(targets):
        t = np.asarray(targets)
        accuracy = float((probs.argmax(1) == t).mean())
        entry.update(micro_accuracy=accuracy, labelled_images=int(len(t)),
                     accuracy_change=accuracy - float((reference.argmax(1) == t).mean()))  # fmt: skip
    return entry


def measure_precisions(
    model: ImageClassifier,
    images: Sequence[ImageData],
    precisions: Sequence[str] | None = None,
    *,
    unseen: bool = True,
) -> dict[str, dict]:
    """Metrics of ``model`` on ``images`` under each precision (default:
    :func:`available_precisions`), compared with fp32 on the same images.

    Images need no label: top-label agreement with fp32 is what certifies a lossy
    precision (:func:`imgclf.nets.engines.certificate_verdict`); labelled ones add the
    accuracy change. ``unseen``: the head was not fitted on these images (held-out or
    new ones); agreement on training images overstates it, so those do not count.
    The fp32 entry has the accuracy where labels exist; the others are certificate
    entries (:func:`compare_to_fp32`). The model's engine settings are restored after.
    """
    _refuse_multilabel(model)
    images = list(images)
    if not images:
        raise DataError("no images to measure precisions on")
    precisions = list(precisions or available_precisions(model))
    if precisions[0] != "fp32":
        precisions = ["fp32", *(p for p in precisions if p != "fp32")]  # the reference comes first
    arrays, kept = _decode(images, model.preprocessing)
    labelled = all(images[i].label is not None for i in kept)
    unknown = sorted({images[i].label for i in kept if images[i].label not in model.labels}) if labelled else []
    if unknown:  # was checked after model.labels.index raised ValueError on them: a traceback
        raise DataError(f"images have labels the model does not know: {', '.join(unknown)} (the model knows "
                        f"{', '.join(model.labels)}); give images of its labels, or unlabelled ones")  # fmt: skip
    targets = [model.labels.index(images[i].label) for i in kept] if labelled else None
    saved = (model.engine, model.precision, model.features_engine)
    results: dict[str, dict] = {}
    reference = None
    try:
        for precision in precisions:
            engine = "auto" if model.device == "cpu" or precision != "fp32" else "torch"
            choice = model.use_engine(engine, precision)
            probs = model.predict_proba_arrays(arrays)
            if reference is None:
                reference = probs
                entry = {"engine": choice.engine, "images": len(kept)}
                if targets is not None:
                    metrics = compute_metrics(probs, targets, model.labels)
                    entry.update(micro_accuracy=metrics.micro_accuracy, macro_accuracy=metrics.macro_accuracy,
                                 log_loss=metrics.log_loss)  # fmt: skip
            else:
                entry = {"engine": choice.engine, **compare_to_fp32(reference, probs, targets, len(kept) if unseen else 0)}
            results[precision] = entry
    finally:
        model.engine, model.precision, model.features_engine = saved
    return results


def record_certificate(model, precision: str, entry: dict) -> None:
    """Keep ``entry`` as the model's certificate for ``precision`` (saved with the model)."""
    metrics = model.info.get("precision_metrics")
    model.info["precision_metrics"] = {**(metrics if isinstance(metrics, dict) else {}), precision: entry}
    model.features_engine = None  # the next batch goes through choose_engine again
