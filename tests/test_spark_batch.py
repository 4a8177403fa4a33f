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


# --- issue 21 round 2: errors name the file (item 9), the workers' Python (item 15), links (item 15) ---


def test_errors_name_the_file_when_the_path_column_is_given(spark, small_onnx_model, tmp_path):
    """Item 9: an unreadable image's error said "image 18" (its place in a batch), not its file."""
    from imgclf.spark import predict_udf

    folder = scoring_folder(tmp_path / "images")
    images = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(str(folder))
    rows = images.select("path", predict_udf(small_onnx_model, batch_size=4)("content", "path").alias("p")).collect()
    errors = {r["path"]: r["p"]["error"] for r in rows if r["p"]["error"]}
    assert {os.path.basename(p) for p in errors} == CORRUPT - {"empty.png"}
    for path, error in errors.items():
        assert error.startswith(f"{path}: "), error
    assert all(r["p"]["label"] for r in rows if r["path"] not in errors)


def test_the_path_column_where_the_bytes_go_is_one_clear_line(spark, small_onnx_model, tmp_path):
    """Item 9: passing the path column gave a raw TypeError (string argument without an encoding)."""
    from imgclf.spark import predict_udf

    folder = scoring_folder(tmp_path / "images")
    images = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(str(folder))
    udf = predict_udf(small_onnx_model)
    for columns in (["path"], ["path", "content"]):
        with pytest.raises(Exception) as raised:
            images.select(udf(*columns).alias("p")).collect()
        message = str(raised.value)
        assert "the image column holds text ('file:" in message and 'predict_udf(model)("content", "path")' in message
        assert "without an encoding" not in message


def test_workers_that_cannot_import_imgclf_are_one_line_on_the_driver(spark, small_onnx_model, tmp_path):
    """Item 15: without PYSPARK_PYTHON the executors run python3, and every task failed with a worker
    traceback ending in "No module named 'imgclf'". A Python that has pyspark but not imgclf's
    dependencies (this one without site-packages) stands in for it."""
    from imgclf.errors import MissingDependencyError
    from imgclf.spark import predict_udf

    bare = tmp_path / "bare-python"
    bare.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    bare.chmod(0o755)
    sc = spark.sparkContext
    was = sc.pythonExec
    sc.pythonExec = str(bare)
    try:
        with pytest.raises(MissingDependencyError) as raised:
            predict_udf(small_onnx_model)
    finally:
        sc.pythonExec = was
    message = str(raised.value)
    assert len(message.splitlines()) == 1
    assert message.startswith("Spark's Python workers cannot import imgclf (ModuleNotFoundError: No module named ")
    assert f"they run {bare}" in message and f"set PYSPARK_PYTHON={sys.executable}" in message
    predict_udf(small_onnx_model)  # the workers' own Python again: checked, and fine


def _spark_recipe() -> str:
    """The Python block of docs/scoring-at-scale.md's Spark section."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "scoring-at-scale.md").read_text(encoding="utf-8")
    section = text.split("\n## Spark\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_documented_recipe_counts_each_image_once_beside_a_link_loop(spark, small_onnx_model, tmp_path):
    """Item 15: the documented recipe (recursiveFileLookup) followed a `loop -> .` link and scored
    1,805 rows for 206 images. Names with Hadoop's glob characters are each read once too."""
    import pyarrow.parquet as pq

    folder = scoring_folder(tmp_path / "photos")
    (folder / "loop").symlink_to(".")
    (folder / "nested" / "up").symlink_to("..")
    odd = ["a [1] {b,c} *?.jpg", "50% #2.jpg"]
    for name in [*odd, "co:lon.jpg"]:
        (folder / name).write_bytes((folder / "classic-daisy.jpg").read_bytes())
    expected = predict_json(small_onnx_model, folder)  # imgclf's walk: links to folders are not followed
    del expected[str(folder / "empty.png")]  # Spark's binaryFile source lists no zero-byte files
    del expected[str(folder / "co:lon.jpg")]  # Hadoop's local file system cannot read it: left out, with a warning
    out = tmp_path / "out"
    code = _spark_recipe().replace('"photos/"', repr(str(folder))).replace('"pets.onnx"', repr(str(small_onnx_model)))
    code = code.replace('.write.parquet("out")', f".write.parquet({str(out)!r})")
    with pytest.warns(UserWarning, match=r"left out 1 file\(s\) that Spark cannot read: .*co:lon.jpg"):
        exec(code, {"spark": spark})
    rows = pq.read_table(out).to_pylist()
    paths = [r["path"].removeprefix("file:") for r in rows]
    assert sorted(paths) == sorted(expected), "each image once, nothing under loop/ or up/"
    for name in odd:
        assert str(folder / name) in paths
    labels = {r["path"].removeprefix("file:"): r["label"] for r in rows}
    assert all(labels[p] == expected[p].get("label") for p in expected)


def test_a_multilabel_model_gives_its_sets_and_a_single_label_model_null(spark, small_multilabel_model,
                                                                          small_onnx_model, tmp_path):  # fmt: skip
    """Spark crashed on every multi-label batch whose sets were not top_k long (a reshape of the
    padded lists), and gave a single-label model's `labels` as top_k nulls instead of null."""
    import shutil as sh

    from imgclf.spark import predict_udf

    model, onnx_path, held_out = small_multilabel_model
    folder = tmp_path / "mosaics"
    folder.mkdir()
    for image in held_out:
        sh.copy(image, folder / image.name)
    (folder / "broken.jpg").write_bytes(b"not an image")
    images = spark.read.format("binaryFile").load(str(folder))
    scored = images.select("path", predict_udf(onnx_path, top_k=3)("content", "path").alias("p")).collect()
    assert len(scored) == len(held_out) + 1
    sizes = set()
    for r in scored:
        name = r["path"].rsplit("/", 1)[-1]
        if name == "broken.jpg":
            assert r["p"]["error"] and r["p"]["labels"] is None and r["p"]["label_probabilities"] is None
            continue
        said = model.predict(folder / name)
        expected = said.labels
        assert r["p"]["known"] is not None and r["p"]["known"] == said.known  # the detector's, as in Python
        assert r["p"]["labels"] == [lbl for lbl, _ in expected]
        assert r["p"]["label_probabilities"] == pytest.approx([p for _, p in expected], abs=1e-4)
        sizes.add(len(expected))
    assert sizes - {3}, "no set of another size than top_k: the crash would not show"
    single = spark.read.format("binaryFile").load(str(folder / held_out[0].name))
    (row,) = single.select(predict_udf(small_onnx_model, top_k=3)("content").alias("p")).collect()
    assert row["p"]["labels"] is None and row["p"]["label_probabilities"] is None and row["p"]["label"]
