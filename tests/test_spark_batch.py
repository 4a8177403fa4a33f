"""Spark: `imgclf.spark.predict_udf` on a `binaryFile` DataFrame agrees with plain
predict, on one `local[2]` session for the whole run."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("pyspark")

pytestmark = pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas:FutureWarning")

from .conftest import CORRUPT, assert_agrees_with_predict_json, predict_json, scoring_folder  # noqa: E402


@pytest.fixture(scope="session")
def spark():
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.skip("Spark needs Java (17 or newer): none found on PATH or in JAVA_HOME")
    from pyspark.sql import SparkSession

    os.environ["PYSPARK_PYTHON"] = sys.executable  # workers run this interpreter, with imgclf on its path
    session = (SparkSession.builder.master("local[2]").appName("imgclf-tests").config("spark.ui.enabled", "false")
               .config("spark.sql.shuffle.partitions", "2").getOrCreate())  # fmt: skip
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def test_predict_udf_agrees_with_predict_json(spark, small_onnx_model, tmp_path):
    from pyspark.sql import functions as F

    from imgclf.spark import predict_udf

    folder = scoring_folder(tmp_path / "images")
    images = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(str(folder))
    scored = images.select("path", predict_udf(small_onnx_model, top_k=2, batch_size=4)("content").alias("p"))
    rows = [{"path": r["path"].removeprefix("file:"), **r["p"].asDict()}
            for r in scored.select("path", F.col("p")).collect()]  # fmt: skip
    expected = predict_json(small_onnx_model, folder)
    del expected[str(folder / "empty.png")]  # Spark's binaryFile source lists no zero-byte files
    assert_agrees_with_predict_json(rows, expected)
    assert {os.path.basename(r["path"]) for r in rows if r["error"]} == CORRUPT - {"empty.png"}
    for r in rows:
        if r["error"] is None:
            assert r["top_labels"][0] == r["label"] and len(r["top_probabilities"]) == 2
        else:
            assert r["top_labels"] == [None, None]


def test_predict_udf_refuses_a_bad_model_before_spark_runs(tmp_path):
    from imgclf import ModelFileError
    from imgclf.spark import predict_udf

    (tmp_path / "bad.onnx").write_bytes(b"nonsense")
    with pytest.raises(ModelFileError, match="not a readable ONNX model"):
        predict_udf(tmp_path / "bad.onnx")
    with pytest.raises(ModelFileError, match="model file not found"):
        predict_udf(tmp_path / "missing.onnx")
