"""Torch-free prediction from an exported ONNX model.

Needs only onnxruntime, numpy and Pillow (``pip install 'imgclf[runtime]'``):
importing this module never imports torch. The ONNX file carries its labels
and preprocessing in its metadata, so the file alone is enough.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.data.imaging import Preprocessing
from imgclf.errors import ModelFileError
from imgclf.inference.predictor import Predictor
from imgclf.nets.engines import OnnxSession, _ort

METADATA_KEY = "imgclf"


class OnnxClassifier(Predictor):
    """An exported imgclf model run by ONNX Runtime; same API as ImageClassifier."""

    def __init__(self, session: OnnxSession, config: dict[str, Any], path: str = "<memory>"):
        self.session = session
        self.config = config
        self.path = path
        self.labels = list(config["labels"])
        self.classes_ = self.labels
        self.arch = config.get("arch", "unknown")
        self.preprocessing = Preprocessing.from_dict(config["preprocessing"])
        self.info = {k: v for k, v in config.items() if k not in ("labels", "preprocessing")}

    def _probabilities(self, arrays: np.ndarray) -> np.ndarray:
        return self.session(arrays)


def load_onnx_model(path: str | Path, threads: int | None = None) -> OnnxClassifier:
    """Load an ONNX file exported by imgclf; checks it carries imgclf metadata.

    ``threads``: ONNX Runtime's threads (default: the CPUs, at most 8).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: ONNX model file not found")
    ort = _ort()
    try:
        session = OnnxSession(path, threads=threads)
    except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidGraph,
            ort.capi.onnxruntime_pybind11_state.InvalidProtobuf, RuntimeError) as e:  # fmt: skip
        first = str(e).strip().splitlines()[0][:200]
        raise ModelFileError(f"{path}: not a readable ONNX model ({first})") from None
    raw = session.metadata().get(METADATA_KEY)
    if raw is None:
        raise ModelFileError(f"{path}: ONNX file has no imgclf metadata (labels, preprocessing); export it with "
                             "'imgclf export'")  # fmt: skip
    try:
        config = json.loads(raw)
        Preprocessing.from_dict(config["preprocessing"])
        labels = config["labels"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ModelFileError(f"{path}: imgclf metadata in the ONNX file is incomplete or corrupt") from None
    outputs = session.session.get_outputs()[0].shape
    if isinstance(outputs[-1], int) and outputs[-1] != len(labels):
        raise ModelFileError(f"{path}: ONNX output has {outputs[-1]} classes but metadata names {len(labels)}")
    model = OnnxClassifier(session, config, str(path))
    model.threads = threads
    return model
