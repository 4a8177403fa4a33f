r"""The prediction row: what one scored image carries, defined once, read by every output.

A row is a plain dict keyed by the names in :data:`FIELDS`. Two encodings carry it, both
built here from that one table, so a field added to :data:`FIELDS` appears everywhere:

- **documents** (JSON: ``predict --json``, the HTTP API and the page, :meth:`Prediction.to_dict
  <imgclf.inference.predictor.Prediction.to_dict>`): the keys that apply, in the table's
  order (a scored image has no ``error``, a failed one only ``file`` and ``error``); the
  ranking as ``"scores": [{"label", "probability"}, ...]``, best first;
- **tables** (Parquet, CSV, JSON Lines, Ray, Spark's struct, MLflow's DataFrame):
  ``path`` (valid UTF-8: bytes that are not are written ``\xNN``) and ``path_bytes`` (the
  raw name in hex where it is not UTF-8, else null; :mod:`imgclf.names`), the ranking as two
  list columns ``top_labels`` and ``top_probabilities``. Spark's struct and MLflow's frame
  leave the path out: it stays in the caller's own frame.

:data:`ROW_VERSION` counts changes to the fields: a results folder records it and refuses
to be resumed by another version; the HTTP API answers it with every prediction.
Versions: 1 the first columns; 2 added ``path_bytes``; 3 added ``known`` and ``unknown_score``
(the unknown-input detector, :mod:`imgclf.inference.unknown`); 4 added ``labels`` (a multi-label
model's answer; tables: ``labels`` and ``label_probabilities``, null for a single-label model).

Numpy-free and pyarrow-free: the library's layers ask for the types they need
(:func:`arrow_fields`, :func:`spark_fields`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from imgclf.names import printable, raw_hex

ROW_VERSION = 4


@dataclass(frozen=True)
class RowField:
    """One thing a prediction carries. ``kind`` decides its encodings:
    ``name`` (the image's name), ``text``, ``number`` (float32 in tables), ``flag`` (true or
    false; boolean in tables), ``ranking`` (labels with probabilities, best first) or ``labelset``
    (encoded as a ranking: the labels a multi-label model answers, with their probabilities)."""

    name: str
    kind: str
    help: str


FIELDS: tuple[RowField, ...] = (
    RowField("file", "name", "the image's file name, path or URI, as given"),
    RowField("label", "text", "the most likely label; null when the image could not be scored"),
    RowField("probability", "number", "the probability of that label"),
    RowField("scores", "ranking", "the top-k labels with their probabilities, most likely first"),
    RowField("labels", "labelset", "a multi-label model's answer: every label over its threshold with its "
             "probability, most likely first (may be empty); null for a single-label model"),
    RowField("known", "flag", "false when the image looks like nothing the model was trained on (its features lie "
             "farther from the training images' than the model's threshold); null for a model without a detector"),
    RowField("unknown_score", "number", "how far the image's features lie from the training images' (1 - mean "
             "cosine similarity to the nearest ones): higher is less like them; known is this <= the threshold"),
    RowField("error", "text", "why the image could not be scored, in one line; null when it was"),
)

#: How each kind is written in a table: its columns, as (column suffix or name, element type).
_TABLE = {"name": (("path", "text"), ("path_bytes", "text")), "text": (("", "text"),),
          "number": (("", "number"),), "flag": (("", "flag"),),
          "ranking": (("top_labels", "texts"), ("top_probabilities", "numbers")),
          "labelset": (("", "texts"), ("label_probabilities", "numbers"))}  # fmt: skip
#: Columns that name the image: left out where the caller's own frame keeps the path (Spark, MLflow).
NAME_COLUMNS = ("path", "path_bytes")


def _table_columns(f: RowField) -> tuple[tuple[str, str], ...]:
    return tuple((column or f.name, kind) for column, kind in _TABLE[f.kind])


#: Every table column with its element type (``text``, ``number``, ``flag``, ``texts``, ``numbers``), in order.
TABLE_COLUMNS: tuple[tuple[str, str], ...] = tuple(c for f in FIELDS for c in _table_columns(f))
COLUMNS: tuple[str, ...] = tuple(name for name, _ in TABLE_COLUMNS)
#: The columns of a multi-label answer (``labels``, ``label_probabilities``): any length, null for a single-label model.
SET_COLUMNS: tuple[str, ...] = tuple(c for f in FIELDS if f.kind == "labelset" for c, _ in _table_columns(f))
DOCUMENT_KEYS: tuple[str, ...] = tuple(f.name for f in FIELDS)


def scored(
    file: str,
    label: str,
    probability: float,
    top: Sequence[tuple[str, float]],
    known: bool | None = None,
    unknown_score: float | None = None,
    labels: Sequence[tuple[str, float]] | None = None,
) -> dict:
    """The row of a scored image: ``top`` holds (label, probability) pairs, best first;
    ``known`` and ``unknown_score`` are None for a model without an unknown-input detector;
    ``labels`` a multi-label model's answer (pairs, best first; None for a single-label model)."""
    row = dict.fromkeys(DOCUMENT_KEYS)
    row.update(file=file, label=label, probability=float(probability),
               scores=[(lbl, float(p)) for lbl, p in top], error=None,
               known=None if known is None else bool(known),
               unknown_score=None if unknown_score is None else float(unknown_score))  # fmt: skip
    if labels is not None:
        row["labels"] = [(lbl, float(p)) for lbl, p in labels]
    return row


def rejected(row: dict) -> dict:
    """``row`` as ``--reject-unknown`` writes it: the label ``unknown`` where ``known`` is false
    (the ranking still names the labels the model would have given)."""
    return {**row, "label": UNKNOWN_LABEL} if row.get("known") is False else row


#: The label ``--reject-unknown`` gives an image whose ``known`` is false.
UNKNOWN_LABEL = "unknown"


def failed(file: str, error: str) -> dict:
    """The row of an image that could not be scored."""
    row = dict.fromkeys(DOCUMENT_KEYS)
    row.update(file=file, error=error)
    return row


def document(row: dict) -> dict:
    """The JSON form of one row: the keys of :data:`DOCUMENT_KEYS` that apply, in order."""
    out = {}
    for f in FIELDS:
        value = row.get(f.name)
        if value is None:
            continue
        if f.kind in ("ranking", "labelset"):
            value = [{"label": lbl, "probability": p} for lbl, p in value]
        elif f.kind in ("name", "text"):  # valid UTF-8, whatever a name's bytes
            value = printable(value)
        out[f.name] = value
    return out


def columns(rows: Sequence[dict], with_name: bool = True) -> dict[str, list]:
    """The table form of ``rows``, column by column in :data:`COLUMNS` order.
    ``with_name=False`` leaves out :data:`NAME_COLUMNS` (Spark, MLflow)."""
    out: dict[str, list] = {}
    for f in FIELDS:
        values = [row.get(f.name) for row in rows]
        if f.kind == "name":
            if with_name:
                out["path"] = [None if v is None else printable(v) for v in values]
                out["path_bytes"] = [None if v is None else raw_hex(v) for v in values]
        elif f.kind in ("ranking", "labelset"):
            (labels, _), (probs, _) = _table_columns(f)
            out[labels] = [None if v is None else [lbl for lbl, _ in v] for v in values]
            out[probs] = [None if v is None else [p for _, p in v] for v in values]
        elif f.kind == "text":  # valid UTF-8, like the path an error may quote
            out[f.name] = [None if v is None else printable(v) for v in values]
        else:
            out[f.name] = values
    return out


def records(rows: Sequence[dict]) -> Iterator[dict]:
    """One flat dict per row, in :data:`COLUMNS` order (CSV and JSON Lines)."""
    cols = columns(rows)
    for i in range(len(rows)):
        yield {name: cols[name][i] for name in COLUMNS}


def arrow_fields(pa, with_name: bool = True) -> list:
    """The table columns as pyarrow fields (``pa``: the pyarrow module)."""
    types = {"text": pa.string(), "number": pa.float32(), "flag": pa.bool_(), "texts": pa.list_(pa.string()),
             "numbers": pa.list_(pa.float32())}  # fmt: skip
    return [pa.field(n, types[k]) for n, k in TABLE_COLUMNS if with_name or n not in NAME_COLUMNS]


def spark_fields(t) -> list:
    """The table columns but the path as Spark struct fields (``t``: ``pyspark.sql.types``)."""
    types = {"text": t.StringType(), "number": t.FloatType(), "flag": t.BooleanType(),
             "texts": t.ArrayType(t.StringType()),
             "numbers": t.ArrayType(t.FloatType())}  # fmt: skip
    return [t.StructField(n, types[k]) for n, k in TABLE_COLUMNS if n not in NAME_COLUMNS]


def line(row: dict, top_k: int = 1) -> str:
    """The terminal's tab-separated line: file, label, probability, ``known`` or ``unknown``
    (``-`` for a model without a detector), and the top ``top_k`` when more than one; for a
    multi-label answer, its labels joined by ``;`` and their probabilities likewise (both
    empty when it answers none) in place of label and probability."""
    known = {True: "known", False: "unknown", None: "-"}[row.get("known")]
    if row.get("labels") is not None:
        said = ";".join(tsv_cell(lbl) for lbl, _ in row["labels"])
        text = f"{tsv_cell(row['file'])}\t{said}\t{';'.join(f'{p:.4f}' for _, p in row['labels'])}\t{known}"
    else:
        text = f"{tsv_cell(row['file'])}\t{tsv_cell(row['label'])}\t{row['probability']:.4f}\t{known}"
    if top_k > 1:
        text += "\t" + ", ".join(f"{tsv_cell(lbl)} {p:.4f}" for lbl, p in row["scores"][:top_k])
    return text


def tsv_cell(text: str) -> str:
    r"""A field for tab-separated output: backslash, tab, newline and carriage return escaped
    (``\\``, ``\t``, ``\n``, ``\r``), so a file name can never break a line or a column;
    bytes of a name that are not UTF-8 are written ``\xNN`` instead of stopping the output."""
    text = text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return printable(text)
