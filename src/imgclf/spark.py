"""Scoring from Spark: a pandas UDF over an image-bytes column.

Built on :func:`pyspark.ml.functions.predict_batch_udf`, which loads the model
once per Python worker and feeds it batches as numpy arrays::

    from imgclf.spark import predict_udf

    images = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load("photos/")
    scored = images.withColumn("prediction", predict_udf("pets.onnx", top_k=3)("content"))
    scored.select("path", "prediction.label", "prediction.probability", "prediction.error")

The UDF returns a struct of ``label``, ``probability``, ``top_labels``,
``top_probabilities`` and ``error``: an unreadable image gives a null label and
probability, nulls in the top-k arrays and its ``error``, and the job carries on.
The model file's bytes travel with the UDF, so executors need no shared storage;
the model loads on each executor through ``imgclf.batch.scoring`` (the same
function as the local and Ray engines). Only this module imports pyspark:
``pip install 'imgclf[spark]'``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imgclf.batch.local import check_options
from imgclf.batch.scoring import ModelFile, load_scoring_model, score_sources
from imgclf.errors import MissingDependencyError
from imgclf.options import SCORING_BATCH_SIZE, TOP_K, install_hint


def _pyspark():
    try:
        import pyspark.ml.functions as ml_functions
        import pyspark.sql.types as types
    except ImportError:
        raise MissingDependencyError(f"the Spark UDF needs pyspark: {install_hint('spark')}") from None
    return ml_functions, types


def result_type():
    """The UDF's Spark type: a struct of the result columns (the path stays in the caller's DataFrame)."""
    _, t = _pyspark()
    return t.StructType([
        t.StructField("label", t.StringType()),
        t.StructField("probability", t.FloatType()),
        t.StructField("top_labels", t.ArrayType(t.StringType())),
        t.StructField("top_probabilities", t.ArrayType(t.FloatType())),
        t.StructField("error", t.StringType()),
    ])  # fmt: skip


def predict_udf(
    model_path: str | Path,
    top_k: int = TOP_K,
    batch_size: int = SCORING_BATCH_SIZE,
    threads: int | None = None,
    engine: str = "auto",
    precision: str = "auto",
):
    """A pandas UDF scoring a column of image bytes (``binaryFile``'s ``content``).

    The model file is read and checked here, on the driver, so a bad one fails
    before any Spark job starts. ``threads``: ONNX Runtime threads per Python worker
    (default: the executor's CPUs, at most 8; set it to ``spark.task.cpus`` when
    several tasks share an executor). ``engine`` and ``precision``: as ``imgclf predict``.
    """
    ml_functions, _ = _pyspark()
    check_options(top_k=top_k, batch_size=batch_size, engine=engine, precision=precision)
    model_file = ModelFile.read(model_path)
    labels = load_scoring_model(model_path, "cpu", None, engine, precision).labels
    k = min(top_k, len(labels))

    def make_predict_fn():
        predictor = model_file.load("cpu", threads, engine, precision)

        def predict(contents: np.ndarray) -> dict[str, np.ndarray]:
            names = [f"image {i}" for i in range(len(contents))]
            sources = [None if c is None else bytes(c) for c in contents]
            result = score_sources(predictor, names, sources, top_k, workers=threads or 1)
            missing = [None] * k
            return {
                "label": np.array(result.labels, dtype=object),
                "probability": np.array([np.nan if p is None else p for p in result.probabilities], np.float32),
                "top_labels": np.array([t or missing for t in result.top_labels], dtype=object).reshape(-1, k),
                "top_probabilities": np.array([t or missing for t in result.top_probabilities], dtype=object).reshape(
                    -1, k
                ),  # fmt: skip
                "error": np.array(result.errors, dtype=object),
            }

        return predict

    return ml_functions.predict_batch_udf(make_predict_fn, return_type=result_type(), batch_size=batch_size)
