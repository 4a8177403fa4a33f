"""imgclf: train your own image classifier from a folder of pictures.

The public API. Importing ``imgclf`` does not import torch; the names that
need it are loaded on first use, so the torch-free runtime stays light.
"""

from __future__ import annotations

import typing as _typing
from importlib import import_module as _import_module

from imgclf.data.images import ImageData, image_from_bytes, load_images_from_directory
from imgclf.data.imaging import Preprocessing
from imgclf.data.splits import shuffle, stratified_folds, train_test_split
from imgclf.errors import (
    ArchitectureError,
    DataError,
    ImageDecodeError,
    ImgclfError,
    ModelFileError,
    OptionError,
    WeightsUnavailableError,
)
from imgclf.inference.metrics import MulticlassMetrics, compute_metrics
from imgclf.inference.predictor import Prediction
from imgclf.version import __version__ as __version__

_LAZY = {
    "ImageClassificationTrainer": "imgclf.training.trainer",
    "EarlyStopping": "imgclf.training.history",
    "EpochMetrics": "imgclf.training.history",
    "FineTuneOptions": "imgclf.training.finetune",
    "ImageClassifier": "imgclf.inference.model",
    "load_model": "imgclf.inference.loading",
    "load_onnx_model": "imgclf.inference.runtime",
    "OnnxClassifier": "imgclf.inference.runtime",
    "ARCHITECTURES": "imgclf.nets.archs",
    "sample_data_dir": "imgclf.sample_data",
    "audit": "imgclf.insight.audit",
    "AuditResult": "imgclf.insight.audit",
    "write_report": "imgclf.insight.report",
    "calibrate_int8": "imgclf.inference.precision",
    "measure_precisions": "imgclf.inference.precision",
    "record_certificate": "imgclf.inference.precision",
    "choose_engine": "imgclf.nets.engines",
}

if _typing.TYPE_CHECKING:
    from imgclf.inference.loading import load_model
    from imgclf.inference.model import ImageClassifier
    from imgclf.inference.precision import calibrate_int8, measure_precisions, record_certificate
    from imgclf.inference.runtime import OnnxClassifier, load_onnx_model
    from imgclf.insight.audit import AuditResult, audit
    from imgclf.insight.report import write_report
    from imgclf.nets.archs import ARCHITECTURES
    from imgclf.nets.engines import choose_engine
    from imgclf.sample_data import sample_data_dir
    from imgclf.training.finetune import FineTuneOptions
    from imgclf.training.history import EarlyStopping, EpochMetrics
    from imgclf.training.trainer import ImageClassificationTrainer


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(_import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'imgclf' has no attribute '{name}'")


def __dir__() -> list[str]:
    """The public API, the names loaded on first use included, and the module's own dunders
    (not the helpers this file imports, nor whichever subpackages happen to be loaded)."""
    return sorted({*__all__, *(name for name in globals() if name.startswith("__"))})


__all__ = [
    "ARCHITECTURES", "ArchitectureError", "DataError", "EarlyStopping", "EpochMetrics", "FineTuneOptions",
    "ImageClassificationTrainer", "ImageClassifier", "ImageData", "ImageDecodeError", "ImgclfError",
    "ModelFileError", "MulticlassMetrics", "OnnxClassifier", "OptionError", "Prediction", "Preprocessing",
    "WeightsUnavailableError", "compute_metrics", "image_from_bytes", "load_images_from_directory",
    "load_model", "load_onnx_model", "sample_data_dir", "shuffle", "stratified_folds", "train_test_split",
    "audit", "AuditResult", "write_report", "calibrate_int8", "measure_precisions", "record_certificate",
    "choose_engine",
]  # fmt: skip
