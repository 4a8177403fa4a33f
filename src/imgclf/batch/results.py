"""One result row per input, the same in every engine and every file format.

The row is :mod:`imgclf.rows`'s (its table encoding: ``path``, ``label``, ``probability``,
``top_labels``, ``top_probabilities``, ``error``, ``path_bytes``); a results folder records
its version, the model's SHA-256 and labels as metadata (:func:`result_metadata`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from imgclf import rows as prediction_rows
from imgclf.errors import ImgclfError
from imgclf.inference.multilabel import labels_over
from imgclf.rows import COLUMNS as COLUMNS  # the table's columns, re-exported for the writers

METADATA_KEY = "imgclf"
FORMAT_NAME = "imgclf-predictions"
FORMAT_VERSION = prediction_rows.ROW_VERSION


def result_metadata(
    model_name: str, model_sha256: str, labels: Sequence[str], top_k: int, ran: dict | None = None
) -> dict:
    """What a results file says about how it was made; a resumed run must match it.

    ``ran``: the engine, precision and CPU capabilities that scored it
    (:meth:`imgclf.nets.engines.EngineChoice.to_dict`), so a resumed run never mixes precisions.
    """
    from imgclf.version import __version__

    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "model": model_name,
            "model_sha256": model_sha256, "labels": list(labels), "top_k": top_k, "imgclf_version": __version__,
            **({"ran": ran} if ran else {})}  # fmt: skip


def arrow_schema(metadata: dict | None = None):
    """The Arrow schema of result rows, with ``metadata`` as Parquet key-value metadata."""
    import pyarrow as pa

    fields = prediction_rows.arrow_fields(pa)
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(metadata)} if metadata else None)


@dataclass
class ResultBatch:
    """Result rows (:mod:`imgclf.rows`) of a batch of inputs, in input order."""

    rows: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def build(
        cls,
        paths: Sequence[str],
        outcomes: Sequence[np.ndarray | ImgclfError],
        probabilities: np.ndarray,
        labels: Sequence[str],
        top_k: int,
        unknown_scores: np.ndarray | None = None,
        known: np.ndarray | None = None,
        thresholds: Sequence[float] | None = None,
    ) -> ResultBatch:
        """Rows for ``paths``: ``outcomes`` are decoded images or their errors, and
        ``probabilities`` (and ``unknown_scores`` and ``known``, for a model with an
        unknown-input detector) hold one row per decoded image, in order. ``thresholds``: a
        multi-label model's, whose rows then carry the labels over them."""
        k = min(top_k, len(labels))
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k] if len(probabilities) else None
        batch = cls()
        scored = 0
        for path, outcome in zip(paths, outcomes):
            if isinstance(outcome, ImgclfError):
                batch.rows.append(prediction_rows.failed(path, str(outcome)))
                continue
            best, probs = order[scored], probabilities[scored]
            top = [(labels[i], float(probs[i])) for i in best]
            answered = None if thresholds is None else labels_over(probs, thresholds, labels)
            batch.rows.append(prediction_rows.scored(
                path, top[0][0], top[0][1], top, None if known is None else bool(known[scored]),
                None if unknown_scores is None else float(unknown_scores[scored]), answered))  # fmt: skip
            scored += 1
        return batch

    @property
    def failed(self) -> int:
        return sum(row["error"] is not None for row in self.rows)

    def columns(self, with_name: bool = True) -> dict[str, list]:
        return prediction_rows.columns(self.rows, with_name)

    def records(self) -> Iterator[dict]:
        """One dict per row, columns in :data:`COLUMNS` order (for CSV and JSON Lines)."""
        return prediction_rows.records(self.rows)

    def to_arrow(self, schema=None):
        import pyarrow as pa

        return pa.Table.from_pydict(self.columns(), schema=schema or arrow_schema())
