"""Scoring from Spark: a pandas UDF over an image-bytes column (and, to name each image, its path).

Built on :func:`pyspark.ml.functions.predict_batch_udf`, which loads the model
once per Python worker and feeds it batches as numpy arrays::

    from imgclf.spark import image_paths, predict_udf

    images = spark.read.format("binaryFile").load(image_paths("photos/"))
    scored = images.withColumn("prediction", predict_udf("pets.onnx", top_k=3)("content", "path"))
    scored.select("path", "prediction.label", "prediction.probability", "prediction.error")

The UDF returns a struct of ``label``, ``probability``, ``top_labels``,
``top_probabilities`` and ``error``: an unreadable image gives a null label and
probability, nulls in the top-k arrays and its ``error`` (naming its path when the
path column is given), and the job carries on. The model file's bytes travel with
the UDF, so executors need no shared storage; the model loads on each executor
through ``imgclf.batch.scoring`` (the same function as the local and Ray engines).

:func:`image_paths` lists images as ``imgclf predict`` does (links to folders are not
followed, so a ``loop -> .`` link counts nothing twice; Spark's own
``recursiveFileLookup`` follows it), for ``binaryFile`` to read.

Before anything runs, a one-row Spark job checks that the executors' Python (``PYSPARK_PYTHON``,
not necessarily this one) can import imgclf. Only this module imports pyspark:
``pip install 'imgclf[spark]'``.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from imgclf import rows
from imgclf.batch.local import check_options
from imgclf.batch.scoring import ModelFile, load_scoring_model, score_sources
from imgclf.errors import MissingDependencyError, OptionError
from imgclf.names import is_text, printable
from imgclf.options import SCORING_BATCH_SIZE, TOP_K, install_hint

#: What names an image in its error when the UDF is not given the path column.
UNNAMED = "image"
#: The module whose import the executors' check tries: what the UDF imports there.
_WORKER_MODULE = "imgclf.batch.scoring"
#: Spark applications (and their workers' Python) whose executors were found to import imgclf.
_checked: set[tuple[str, str]] = set()


def _pyspark():
    try:
        import pyspark.ml.functions as ml_functions
        import pyspark.sql.types as types
    except ImportError:
        raise MissingDependencyError(f"the Spark UDF needs pyspark: {install_hint('spark')}") from None
    return ml_functions, types


def result_type():
    """The UDF's Spark type: a struct of the result row's columns (:mod:`imgclf.rows`) but the
    path, which stays in the caller's DataFrame."""
    _, t = _pyspark()
    return t.StructType(rows.spark_fields(t))


def _batch_type():
    """The struct ``predict_batch_udf`` returns: :func:`result_type` with each flag (``known``) as
    a float (1, 0, NaN for null), since it takes no booleans; :func:`predict_udf` casts them back."""
    _, t = _pyspark()
    flags = {name for name, kind in rows.TABLE_COLUMNS if kind == "flag"}
    return t.StructType([t.StructField(f.name, t.FloatType()) if f.name in flags else f for f in rows.spark_fields(t)])


def _with_flags(column, multilabel: bool):
    """The batch UDF's struct as :func:`result_type`: its flags cast to booleans, and a
    multi-label answer's padded lists (:func:`_struct_columns`) cut back to the labels answered
    (null for an image not scored, and for every image of a single-label model)."""
    from pyspark.sql import functions as F

    types = {f.name: f.dataType for f in result_type().fields}

    def column_of(name: str, kind: str):
        if kind == "flag":
            return column[name].cast("boolean")
        if name in rows.SET_COLUMNS:
            if not multilabel:
                return F.lit(None).cast(types[name])
            return F.when(column["error"].isNull(), F.filter(column[name], lambda x: x.isNotNull()))
        return column[name]

    return F.struct(*[column_of(name, kind).alias(name)
                      for name, kind in rows.TABLE_COLUMNS if name not in rows.NAME_COLUMNS])  # fmt: skip


def _struct_columns(columns: dict[str, list], k: int, n_labels: int) -> dict[str, np.ndarray]:
    """The result columns as the arrays ``predict_batch_udf`` wants: lists as (rows, width) object
    arrays, padded with nulls (null lists as all nulls): ``k`` wide for the ranking, ``n_labels``
    for a multi-label answer, whose sets have any size; numbers as float32 with NaN for null."""
    out = {}
    for name, kind in rows.TABLE_COLUMNS:
        if name not in columns:
            continue
        values = columns[name]
        if kind in ("texts", "numbers"):
            width = n_labels if name in rows.SET_COLUMNS else k
            padded = [list(v or []) + [None] * (width - len(v or [])) for v in values]
            out[name] = np.array(padded, dtype=object).reshape(-1, width)
        elif kind in ("number", "flag"):  # a flag travels as 1.0, 0.0 or NaN (see _batch_type)
            out[name] = np.array([np.nan if v is None else float(v) for v in values], np.float32)
        else:
            out[name] = np.array(values, dtype=object)
    return out


def predict_udf(
    model_path: str | Path,
    top_k: int = TOP_K,
    batch_size: int = SCORING_BATCH_SIZE,
    threads: int | None = None,
    engine: str = "auto",
    precision: str = "auto",
):
    """A pandas UDF scoring a column of image bytes (``binaryFile``'s ``content``); give the
    path column too, ``predict_udf(model)("content", "path")``, and each error names its file.

    The model file is read and checked here, on the driver, so a bad one fails
    before any Spark job starts; so does an executor Python that cannot import imgclf
    (checked by a one-row job when a Spark session is active). ``threads``: ONNX Runtime
    threads per Python worker (default: the executor's CPUs, at most 8; set it to
    ``spark.task.cpus`` when several tasks share an executor). ``engine`` and
    ``precision``: as ``imgclf predict``.
    """
    ml_functions, _ = _pyspark()
    check_options(top_k=top_k, batch_size=batch_size, engine=engine, precision=precision)
    model_file = ModelFile.read(model_path)
    driver_model = load_scoring_model(model_path, "cpu", None, engine, precision)
    labels, multilabel = driver_model.labels, getattr(driver_model, "thresholds", None) is not None
    k = min(top_k, len(labels))
    check_workers()

    def scorer():
        predictor = model_file.load("cpu", threads, engine, precision)

        def score(contents: np.ndarray, paths: np.ndarray | None) -> dict[str, np.ndarray]:
            _check_columns(contents, paths)
            names = [UNNAMED] * len(contents) if paths is None else [UNNAMED if p is None else str(p) for p in paths]
            sources = [None if c is None else bytes(c) for c in contents]
            result = score_sources(predictor, names, sources, top_k, workers=threads or 1)
            return _struct_columns(result.columns(with_name=False), k, len(labels))

        return score

    def make_predict_fn():  # predict_batch_udf counts the parameters: one column
        score = scorer()

        def predict(contents: np.ndarray) -> dict[str, np.ndarray]:
            return score(contents, None)

        return predict

    def make_named_predict_fn():  # two columns: the bytes and the paths
        score = scorer()

        def predict(contents: np.ndarray, paths: np.ndarray) -> dict[str, np.ndarray]:
            return score(contents, paths)

        return predict

    unnamed = ml_functions.predict_batch_udf(make_predict_fn, return_type=_batch_type(), batch_size=batch_size)
    named = ml_functions.predict_batch_udf(make_named_predict_fn, return_type=_batch_type(), batch_size=batch_size)

    def udf(content, path=None):
        """The prediction column for ``content`` (image bytes) and, to name each image, ``path``."""
        check_workers()
        return _with_flags(unnamed(content) if path is None else named(content, path), multilabel)

    return udf


def _check_columns(contents: np.ndarray, paths: np.ndarray | None) -> None:
    """Refuse, in one line, a batch whose image column holds text (the path column given
    where the bytes go) or whose path column holds anything but text."""
    first = next((c for c in contents if c is not None), None)
    if isinstance(first, str):
        raise OptionError(f"predict_udf: the image column holds text ({first[:80]!r}), not image bytes: give "
                          "binaryFile's content column, and the path column second to name the images: "
                          "predict_udf(model)(\"content\", \"path\")")  # fmt: skip
    if paths is not None:
        named = next((p for p in paths if p is not None), None)
        if named is not None and not isinstance(named, str):
            raise OptionError(f"predict_udf: the path column holds {type(named).__name__}, not text: give the "
                              "image bytes first and their path second: predict_udf(model)(\"content\", \"path\")")  # fmt: skip


def check_workers(spark=None) -> None:
    """Refuse, in one line, a Spark whose Python workers cannot import imgclf.

    The executors run ``PYSPARK_PYTHON`` (``python3`` on the PATH when it is not set), not
    necessarily the driver's Python; without imgclf there, every task would fail with a
    worker traceback ending in ``No module named 'imgclf'``. A one-row job imports what
    the UDF needs, once per Spark application. Without an active session (or under Spark
    Connect, which has no SparkContext here), nothing is checked.
    """
    from pyspark.sql import SparkSession

    spark = spark or SparkSession.getActiveSession()
    if spark is None:
        return
    try:
        sc = spark.sparkContext
    except Exception:  # Spark Connect
        return
    key = (sc.applicationId, sc.pythonExec)
    if key in _checked:
        return
    import importlib

    level = _log_level(sc)
    if level is not None:
        sc.setLogLevel("OFF")  # a failing task logs its whole stack trace; the line below says it
    try:
        sc.parallelize([_WORKER_MODULE], 1).map(importlib.import_module).map(bool).collect()
    except Exception as e:
        given = "PYSPARK_PYTHON" in os.environ or sc.getConf().get("spark.pyspark.python") is not None
        runs = f"they run {sc.pythonExec}" + ("" if given else " (PYSPARK_PYTHON is not set)")
        raise MissingDependencyError(
            f"Spark's Python workers cannot import imgclf ({_last_error(e)}): {runs}, not this Python "
            f"({sys.executable}); set PYSPARK_PYTHON={sys.executable} before the Spark session starts (on a "
            f"cluster: {install_hint('spark')} with the Python the executors run)"
        ) from None
    finally:
        if level is not None:
            sc.setLogLevel(level)
    _checked.add(key)


def _log_level(sc) -> str | None:
    """The JVM's root log level (log4j 2), or None where it cannot be read."""
    try:
        return str(sc._jvm.org.apache.logging.log4j.LogManager.getRootLogger().getLevel().toString())
    except Exception:
        return None


def _last_error(error: BaseException) -> str:
    """The Python exception line at the end of a worker's traceback, e.g.
    ``ModuleNotFoundError: No module named 'imgclf'``."""
    for line in reversed(str(error).splitlines()):
        line = line.strip()
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit): ", line):
            return line
    first = str(error).strip().splitlines()
    return f"{type(error).__name__}: {first[0][:200]}" if first else type(error).__name__


def image_paths(*inputs: str | Path | Iterable[str | Path]) -> list[str]:
    """Image files below folders (or named directly), as ``imgclf predict`` finds them,
    for ``spark.read.format("binaryFile").load(image_paths("photos/"))``.

    Links to folders are not followed (a ``loop -> .`` link would make Spark's
    ``recursiveFileLookup`` read every image again under ``loop/loop/...``); hidden files
    and tool folders are skipped. Each path is an absolute ``file:`` URI with Hadoop's glob
    characters escaped, so a name such as ``a[1].jpg`` is read as itself. Files Spark cannot
    read (a name that is not UTF-8, or a ``:`` in the file's name, which Hadoop's local file
    system refuses) are left out with a warning naming the first: score them with ``imgclf predict``.
    """
    from imgclf.data.images import find_image_files

    given: list[str | Path] = []
    for item in inputs:
        given.extend([item] if isinstance(item, (str, Path)) else item)
    files = find_image_files(given)
    unreadable = [f for f in files if not _spark_can_read(f)]
    if unreadable:
        warnings.warn(f"left out {len(unreadable)} file(s) that Spark cannot read: a name that is not UTF-8, or a "
                      f"':' in the file's name, which Hadoop's local file system refuses (first: "
                      f"{printable(str(unreadable[0]))}); score them with imgclf predict", stacklevel=2)  # fmt: skip
    return [_hadoop_path(f) for f in files if _spark_can_read(f)]


def _spark_can_read(path: Path) -> bool:
    """Whether Spark's ``binaryFile`` can read the local file: its name is text (a Java string),
    with no ':' in the file's own name (Hadoop makes ``.NAME.crc`` of it, a relative path that
    its URIs refuse)."""
    return is_text(str(path)) and ":" not in path.name


def _hadoop_path(path: Path) -> str:
    """``path`` as a Hadoop path that names only itself: ``file:`` URI, glob characters escaped."""
    absolute = os.path.abspath(path)
    return "file://" + re.sub(r"([\\{}\[\]*?])", r"\\\1", absolute)
