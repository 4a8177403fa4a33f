"""imgclf: train your own image classifier from a folder of pictures.

The public API. Importing ``imgclf`` does not import torch; the names that
need it are loaded on first use, so the torch-free runtime stays light.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from imgclf.data import (
    ImageData,
    image_from_bytes,
    load_images_from_directory,
    shuffle,
    stratified_folds,
    train_test_split,
)
from imgclf.errors import (
    ArchitectureError,
    DataError,
    ImageDecodeError,
    ImgclfError,
    ModelFileError,
    OptionError,
    WeightsUnavailableError,
)
from imgclf.imaging import Preprocessing
from imgclf.metrics import MulticlassMetrics, compute_metrics
from imgclf.predictor import Prediction

__version__ = "0.1.0"

_LAZY = {
    "ImageClassificationTrainer": "imgclf.train",
    "EarlyStopping": "imgclf.train",
    "EpochMetrics": "imgclf.train",
    "FineTuneOptions": "imgclf.finetune",
    "ImageClassifier": "imgclf.model",
    "load_model": "imgclf.model",
    "load_onnx_model": "imgclf.runtime",
    "OnnxClassifier": "imgclf.runtime",
    "ARCHITECTURES": "imgclf.archs",
    "sample_data_dir": "imgclf.sample_data",
}

if TYPE_CHECKING:
    from imgclf.archs import ARCHITECTURES
    from imgclf.finetune import FineTuneOptions
    from imgclf.model import ImageClassifier, load_model
    from imgclf.runtime import OnnxClassifier, load_onnx_model
    from imgclf.sample_data import sample_data_dir
    from imgclf.train import EarlyStopping, EpochMetrics, ImageClassificationTrainer


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'imgclf' has no attribute '{name}'")


__all__ = [
    "ARCHITECTURES", "ArchitectureError", "DataError", "EarlyStopping", "EpochMetrics", "FineTuneOptions",
    "ImageClassificationTrainer", "ImageClassifier", "ImageData", "ImageDecodeError", "ImgclfError",
    "ModelFileError", "MulticlassMetrics", "OnnxClassifier", "OptionError", "Prediction", "Preprocessing",
    "WeightsUnavailableError", "compute_metrics", "image_from_bytes", "load_images_from_directory",
    "load_model", "load_onnx_model", "sample_data_dir", "shuffle", "stratified_folds", "train_test_split",
]  # fmt: skip
