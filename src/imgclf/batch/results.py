r"""One result row per input, the same in every engine and every file format.

Columns: ``path`` (valid UTF-8: a name's bytes that are not UTF-8 are written ``\xNN``),
``label``, ``probability``, ``top_labels``, ``top_probabilities`` (the ``top_k`` most
likely labels, best first), ``error`` (null when the image was scored; label and
probabilities are null when it was not) and ``path_bytes`` (the name's raw bytes in
hex where it is not UTF-8, else null; :mod:`imgclf.names`). Format version 2 added
``path_bytes``. The model's
SHA-256 and labels travel as metadata (:func:`result_metadata`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from imgclf.errors import ImgclfError
from imgclf.names import printable, raw_hex

COLUMNS = ("path", "label", "probability", "top_labels", "top_probabilities", "error", "path_bytes")
METADATA_KEY = "imgclf"
FORMAT_NAME = "imgclf-predictions"
FORMAT_VERSION = 2


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

    fields = [("path", pa.string()), ("label", pa.string()), ("probability", pa.float32()),
              ("top_labels", pa.list_(pa.string())), ("top_probabilities", pa.list_(pa.float32())),
              ("error", pa.string()), ("path_bytes", pa.string())]  # fmt: skip
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(metadata)} if metadata else None)


@dataclass
class ResultBatch:
    """Result rows, column by column (a batch of inputs in input order)."""

    paths: list[str]
    labels: list[str | None]
    probabilities: list[float | None]
    top_labels: list[list[str] | None]
    top_probabilities: list[list[float] | None]
    errors: list[str | None]

    def __len__(self) -> int:
        return len(self.paths)

    @classmethod
    def build(
        cls,
        paths: Sequence[str],
        outcomes: Sequence[np.ndarray | ImgclfError],
        probabilities: np.ndarray,
        labels: Sequence[str],
        top_k: int,
    ) -> ResultBatch:
        """Rows for ``paths``: ``outcomes`` are decoded images or their errors, and
        ``probabilities`` holds one row per decoded image, in order."""
        k = min(top_k, len(labels))
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k] if len(probabilities) else None
        batch = cls([], [], [], [], [], [])
        scored = 0
        for path, outcome in zip(paths, outcomes):
            batch.paths.append(path)
            if isinstance(outcome, ImgclfError):
                batch.labels.append(None)
                batch.probabilities.append(None)
                batch.top_labels.append(None)
                batch.top_probabilities.append(None)
                batch.errors.append(str(outcome))
                continue
            best = order[scored]
            probs = probabilities[scored]
            batch.labels.append(labels[best[0]])
            batch.probabilities.append(float(probs[best[0]]))
            batch.top_labels.append([labels[i] for i in best])
            batch.top_probabilities.append([float(probs[i]) for i in best])
            batch.errors.append(None)
            scored += 1
        return batch

    @property
    def failed(self) -> int:
        return sum(e is not None for e in self.errors)

    def columns(self) -> dict[str, list]:
        return {"path": [printable(p) for p in self.paths], "label": self.labels, "probability": self.probabilities,
                "top_labels": self.top_labels, "top_probabilities": self.top_probabilities,
                "error": [None if e is None else printable(e) for e in self.errors],
                "path_bytes": [raw_hex(p) for p in self.paths]}  # fmt: skip

    def rows(self) -> Iterator[dict]:
        """One dict per row, columns in :data:`COLUMNS` order (for CSV and JSON Lines)."""
        cols = self.columns()
        for i in range(len(self.paths)):
            yield {name: cols[name][i] for name in COLUMNS}

    def to_arrow(self, schema=None):
        import pyarrow as pa

        return pa.Table.from_pydict(self.columns(), schema=schema or arrow_schema())
