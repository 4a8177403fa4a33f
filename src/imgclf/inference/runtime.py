"""Torch-free prediction from an exported ONNX model.

Needs only onnxruntime, numpy and Pillow (``pip install 'imgclf[runtime]'``):
importing this module never imports torch. The ONNX file carries its labels
and preprocessing in its metadata, so the file alone is enough.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from imgclf.errors import ModelFileError
from imgclf.inference.metadata import parse_metadata, preprocessing_of
from imgclf.inference.predictor import Predictor, short_list
from imgclf.nets.engines import OnnxSession, _ort

METADATA_KEY = "imgclf"


class OnnxClassifier(Predictor):
    """An exported imgclf model run by ONNX Runtime; same API as ImageClassifier.

    A model exported with test-time augmentation averages each image with its
    mirror image inside the graph, so nothing here needs to know about it.
    """

    def __init__(self, session: OnnxSession, config: dict[str, Any], path: str = "<memory>"):
        self.session = session
        self.config = config
        self.path = path
        self.labels = list(config["labels"])
        self.classes_ = self.labels
        self.arch = config.get("arch", "unknown")
        self.tta = bool(config.get("tta", False))
        self.preprocessing = preprocessing_of(config)
        self.info = {k: v for k, v in config.items() if k not in ("labels", "preprocessing")}

    def _probabilities(self, arrays: np.ndarray) -> np.ndarray:
        return self.session(arrays)

    def __repr__(self) -> str:
        return (f"OnnxClassifier({self.path!r}, arch={self.arch!r}, labels={short_list(self.labels)}, "
                f"input_size={self.preprocessing.input_size}, tta={self.tta})")  # fmt: skip


def _check_graph(path: Path, session: OnnxSession, config: dict[str, Any]) -> None:
    """The graph's input and output agree with the metadata, and it runs on one image."""
    size, n_labels = config["preprocessing"]["input_size"], len(config["labels"])
    inputs, outputs = session.session.get_inputs(), session.session.get_outputs()
    if len(inputs) != 1 or not outputs:
        raise ModelFileError(
            f"{path}: the ONNX graph takes {len(inputs)} inputs; an imgclf model takes one image batch"
        )
    shape = list(inputs[0].shape)
    wanted = [None, 3, size, size]
    if len(shape) != 4 or any(isinstance(d, int) and w is not None and d != w for d, w in zip(shape, wanted)):
        raise ModelFileError(f"{path}: the ONNX input is {shape} but its metadata says (N, 3, {size}, {size}); "
                             "the file was altered after export")  # fmt: skip
    if inputs[0].type != "tensor(float)":
        raise ModelFileError(f"{path}: the ONNX input is {inputs[0].type}, not float32")
    out_shape = outputs[0].shape
    if isinstance(out_shape[-1], int) and out_shape[-1] != n_labels:
        raise ModelFileError(f"{path}: ONNX output has {out_shape[-1]} classes but metadata names {n_labels}")
    try:
        probe = session(np.zeros((1, 3, size, size), np.float32))
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ModelFileError(f"{path}: the ONNX graph fails on a {size}x{size} image ({first})") from None
    if probe.shape != (1, n_labels) or not np.isfinite(probe).all():
        raise ModelFileError(f"{path}: the ONNX graph gives {tuple(probe.shape)} for one image, not "
                             f"(1, {n_labels}) finite probabilities")  # fmt: skip


def load_onnx_model(path: str | Path, threads: int | None = None) -> OnnxClassifier:
    """Load an ONNX file exported by imgclf; checks its metadata and that its graph fits it.

    ``threads``: ONNX Runtime's threads (default: the CPUs, at most 8).
    """
    from imgclf.filetypes import sniff

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: ONNX model file not found")
    kind = sniff(path)
    if kind == "empty":
        raise ModelFileError(f"{path}: not a readable ONNX model (the file is empty, 0 bytes)")
    _ort()  # a missing onnxruntime is an install problem, not a bad file
    try:
        session = OnnxSession(path, threads=threads)
    except Exception as e:  # onnxruntime raises one exception type per failure (Fail, InvalidProtobuf, ...)
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ModelFileError(f"{path}: not a readable ONNX model ({first})") from None
    raw = session.metadata().get(METADATA_KEY)
    if raw is None:
        raise ModelFileError(f"{path}: ONNX file has no imgclf metadata (labels, preprocessing); export it with "
                             "'imgclf export'")  # fmt: skip
    config = parse_metadata(raw, path, "onnx")
    _check_graph(path, session, config)
    model = OnnxClassifier(session, config, str(path))
    model.threads = threads
    return model
