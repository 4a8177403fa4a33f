"""Batch scoring: millions of images into a results file, here or on a Ray cluster.

- :func:`score_to_folder` (``imgclf predict MODEL INPUT... --out results.parquet``):
  this machine, streamed and resumable (``imgclf.batch.local``);
- :func:`predict_dataset`: a Ray Dataset of images in, a Ray Dataset of results out
  (``imgclf.batch.ray``; ``pip install 'imgclf[ray]'``);
- Spark: ``imgclf.spark.predict_udf``.

Ray, pyarrow and fsspec are imported only by the modules that need them.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_LAZY = {
    "score_to_folder": "imgclf.batch.local",
    "ScoringSummary": "imgclf.batch.local",
    "predict_dataset": "imgclf.batch.ray",
    "score_with_ray": "imgclf.batch.ray",
    "load_scoring_model": "imgclf.batch.scoring",
    "ModelFile": "imgclf.batch.scoring",
}

if TYPE_CHECKING:
    from imgclf.batch.local import ScoringSummary, score_to_folder
    from imgclf.batch.ray import predict_dataset, score_with_ray
    from imgclf.batch.scoring import ModelFile, load_scoring_model


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'imgclf.batch' has no attribute '{name}'")


__all__ = ["ModelFile", "ScoringSummary", "load_scoring_model", "predict_dataset", "score_to_folder", "score_with_ray"]
