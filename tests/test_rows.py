"""The prediction row is defined once (imgclf.rows) and every encoding follows it: a field
added to the table must appear in JSON documents, result files, Spark's struct, the HTTP
API's typed model and MLflow's signature, without a second edit.

The keys and columns users rely on are spelled out here, not imported, so a change to the
row is a visible change to this file (and to ROW_VERSION and the CHANGELOG).
"""

from __future__ import annotations

import json

import pytest

from imgclf import rows

DOCUMENT = ["file", "label", "probability", "scores", "labels", "known", "unknown_score", "error"]
TABLE = ["path", "path_bytes", "label", "probability", "top_labels", "top_probabilities", "labels",
         "label_probabilities", "known", "unknown_score", "error"]  # fmt: skip
SCORED = rows.scored("a\tb.jpg", "roses", 0.75, [("roses", 0.75), ("tulips", 0.2)], True, 0.25)
STRANGE = rows.scored("steel.jpg", "roses", 0.5, [("roses", 0.5)], False, 0.75)
OLD_MODEL = rows.scored("c.jpg", "roses", 0.75, [("roses", 0.75)])  # a model file without a detector
#: A multi-label model's row: the labels over their thresholds, with their probabilities.
MULTI = rows.scored("m.jpg", "roses", 0.9, [("roses", 0.9), ("tulips", 0.7), ("daisy", 0.1)],
                    labels=[("roses", 0.9), ("tulips", 0.7)])  # fmt: skip
BAD_NAME = b"bad\xff.jpg".decode("utf-8", "surrogateescape")  # a name whose bytes are not UTF-8
FAILED = rows.failed(BAD_NAME, f"{BAD_NAME}: not an image")


def test_the_row_users_rely_on():
    assert rows.ROW_VERSION == 4
    assert list(rows.DOCUMENT_KEYS) == DOCUMENT
    assert list(rows.COLUMNS) == TABLE


def test_documents_carry_the_keys_that_apply_in_order():
    scored = rows.document(SCORED)
    assert scored == {"file": "a\tb.jpg", "label": "roses", "probability": 0.75,
                      "scores": [{"label": "roses", "probability": 0.75}, {"label": "tulips", "probability": 0.2}],
                      "known": True, "unknown_score": 0.25}  # fmt: skip
    assert list(scored) == [k for k in DOCUMENT if k not in ("labels", "error")]
    assert rows.document(STRANGE)["known"] is False  # false is said, not left out
    assert "known" not in rows.document(OLD_MODEL) and "unknown_score" not in rows.document(OLD_MODEL)
    failed = rows.document(FAILED)
    assert failed == {"file": "bad\\xff.jpg", "error": "bad\\xff.jpg: not an image"}
    json.dumps(failed)  # valid UTF-8 whatever the file name's bytes


def test_tables_keep_the_raw_name_and_split_the_ranking():
    cols = rows.columns([SCORED, FAILED])
    assert list(cols) == TABLE
    assert cols["path"] == ["a\tb.jpg", "bad\\xff.jpg"] and cols["path_bytes"] == [None, b"bad\xff.jpg".hex()]
    assert cols["top_labels"] == [["roses", "tulips"], None] and cols["top_probabilities"] == [[0.75, 0.2], None]
    assert cols["known"] == [True, None] and cols["unknown_score"] == [0.25, None]
    assert list(rows.columns([SCORED], with_name=False)) == [c for c in TABLE if c not in ("path", "path_bytes")]
    assert [list(r) for r in rows.records([SCORED])] == [TABLE]
    assert cols["labels"] == [None, None] and cols["label_probabilities"] == [None, None]


def test_a_multilabel_row_carries_its_set_of_labels():
    said = rows.document(MULTI)
    assert said["labels"] == [{"label": "roses", "probability": 0.9}, {"label": "tulips", "probability": 0.7}]
    assert list(said) == DOCUMENT[:5]  # a model without a detector: no known
    cols = rows.columns([MULTI, rows.scored("n.jpg", "daisy", 0.3, [("daisy", 0.3)], labels=[])])
    assert cols["labels"] == [["roses", "tulips"], []] and cols["label_probabilities"] == [[0.9, 0.7], []]
    assert rows.line(MULTI) == "m.jpg\troses;tulips\t0.9000;0.7000\t-"
    assert rows.line(rows.scored("n.jpg", "daisy", 0.3, [("daisy", 0.3)], labels=[])) == "n.jpg\t\t\t-"


def test_the_terminal_line_escapes_what_would_break_a_column():
    assert rows.line(SCORED) == "a\\tb.jpg\troses\t0.7500\tknown"
    assert rows.line(SCORED, top_k=2) == "a\\tb.jpg\troses\t0.7500\tknown\troses 0.7500, tulips 0.2000"
    assert rows.line(STRANGE) == "steel.jpg\troses\t0.5000\tunknown"
    assert rows.line(OLD_MODEL) == "c.jpg\troses\t0.7500\t-"


def test_reject_unknown_relabels_only_what_is_not_known():
    assert rows.rejected(STRANGE)["label"] == "unknown" and rows.rejected(STRANGE)["scores"] == [("roses", 0.5)]
    assert rows.rejected(SCORED) == SCORED and rows.rejected(OLD_MODEL) == OLD_MODEL



def test_every_field_reaches_arrow_and_the_typed_http_model():
    pa = pytest.importorskip("pyarrow")
    from imgclf.serve.schemas import ImageResult, PredictResponse

    assert [f.name for f in rows.arrow_fields(pa)] == TABLE
    assert list(ImageResult.model_fields) == DOCUMENT
    assert ImageResult.model_fields["file"].is_required()
    assert PredictResponse.model_fields["row_version"].default == 4
    for f in rows.FIELDS:  # each field documented in the OpenAPI page
        assert ImageResult.model_fields[f.name].description == f.help


def test_every_field_but_the_path_reaches_spark_and_mlflow():
    t = pytest.importorskip("pyspark.sql.types")
    assert [f.name for f in rows.spark_fields(t)] == TABLE[2:]
    pytest.importorskip("mlflow")
    from imgclf.inference.mlflow_model import signature

    assert signature().outputs.input_names() == TABLE[2:]
