"""Multiclass evaluation, as ML.NET reports it and a bit more.

Numpy only, so the torch-free runtime evaluates exactly like training does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_EPS = 1e-15  # probabilities are clipped like ML.NET does before taking logs


@dataclass
class MulticlassMetrics:
    """Metrics of a classifier on labelled images (``labels[i]`` is key ``i``).

    A label none of the images has is *not measured*: its recall and F1 are None (null in
    JSON, ``n/a`` in the table), and so is its precision unless the model answered it for
    some image (then it is measured: the share of those answers that were right, 0.0).
    ``macro_accuracy`` is the mean recall of the labels that have images: the others are
    left out, not counted as 0 (``labels_not_measured`` names them). A label that has
    images but is never predicted keeps precision 0.0, as scikit-learn's
    ``zero_division=0``: the model missed every one of them.
    """

    labels: list[str]
    micro_accuracy: float
    macro_accuracy: float
    log_loss: float
    log_loss_reduction: float
    per_class_log_loss: dict[str, float]
    top_k_accuracy: dict[str, float]  # "k" -> share of images whose label is in the top k
    confusion_matrix: list[list[int]]  # rows: true label, columns: predicted label
    per_class: dict[str, dict[str, float | None]]  # precision, recall, f1 (None: not measured), support
    count: int
    #: ``evaluate(..., reject_unknown=True)``: how many images the unknown-input detector rejected
    #: (``rejected``, a share of ``count``) and the accuracy on the others (``accepted_accuracy``).
    unknown: dict | None = None

    @property
    def labels_not_measured(self) -> list[str]:
        """Labels none of the evaluated images has (support 0), in label order."""
        return [label for label in self.labels if not self.per_class[label]["support"]]

    def to_dict(self) -> dict:
        return {
            "micro_accuracy": self.micro_accuracy,
            "macro_accuracy": self.macro_accuracy,
            "log_loss": self.log_loss,
            "log_loss_reduction": self.log_loss_reduction,
            "per_class_log_loss": self.per_class_log_loss,
            "top_k_accuracy": self.top_k_accuracy,
            "confusion_matrix": self.confusion_matrix,
            "labels": self.labels,
            "per_class": self.per_class,
            "labels_not_measured": self.labels_not_measured,
            "count": self.count,
            **({"unknown": self.unknown} if self.unknown is not None else {}),
        }

    def __str__(self) -> str:
        return format_metrics(self)

    def __repr__(self) -> str:
        return (f"MulticlassMetrics(count={self.count}, labels={len(self.labels)}, "
                f"micro_accuracy={self.micro_accuracy:.4f}, macro_accuracy={self.macro_accuracy:.4f}, "
                f"log_loss={self.log_loss:.4f})")  # fmt: skip


def compute_metrics(probabilities: np.ndarray, targets: Sequence[int], labels: Sequence[str]) -> MulticlassMetrics:
    """All metrics from predicted probabilities (n, classes) and true keys (n,)."""
    probs = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(targets, dtype=np.int64)
    n, k = len(y), len(labels)
    if n == 0:
        raise ValueError("cannot evaluate on zero images")
    predicted = probs.argmax(axis=1)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y, predicted), 1)

    true_p = np.clip(probs[np.arange(n), y], _EPS, 1.0)
    losses = -np.log(true_p)
    log_loss = float(losses.mean())
    prior = np.bincount(y, minlength=k) / n
    prior_log_loss = float(-sum(p * math.log(p) for p in prior if p > 0))
    reduction = (prior_log_loss - log_loss) / prior_log_loss if prior_log_loss > 0 else 0.0

    support = confusion.sum(axis=1)
    predicted_count = confusion.sum(axis=0)
    diag = np.diag(confusion)
    present = support > 0
    per_class = {}
    for i, label in enumerate(labels):
        # not measured (None) where nothing was there to measure: no image of the label for recall,
        # neither an image of it nor an answer of it for precision (docs: MulticlassMetrics)
        precision = float(diag[i] / predicted_count[i]) if predicted_count[i] else (0.0 if support[i] else None)
        recall = float(diag[i] / support[i]) if support[i] else None
        f1 = None
        if precision is not None and recall is not None:
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": int(support[i])}

    ranks = np.argsort(-probs, axis=1, kind="stable")
    top_k = {}
    for kk in range(1, min(5, k) + 1):
        top_k[str(kk)] = float((ranks[:, :kk] == y[:, None]).any(axis=1).mean())

    return MulticlassMetrics(
        labels=list(labels),
        micro_accuracy=float(diag.sum() / n),
        macro_accuracy=float((diag[present] / support[present]).mean()),
        log_loss=log_loss,
        log_loss_reduction=float(reduction),
        per_class_log_loss={label: float(losses[y == i].mean()) for i, label in enumerate(labels) if support[i]},
        top_k_accuracy=top_k,
        confusion_matrix=confusion.tolist(),
        per_class=per_class,
        count=n,
    )


def reliability(confidence: np.ndarray, hit: np.ndarray, bins: int = 10) -> dict:
    """Calibration of probabilities: per bin of ``confidence``, how often the event ``hit``
    happened against the mean probability said, and the expected calibration error (the gaps
    weighted by the share of probabilities in each bin). The report bins a single-label model's
    top probability (hit: it was right) and every label probability of a multi-label model
    (hit: the image has the label)."""
    confidence, hit = np.asarray(confidence, np.float64).ravel(), np.asarray(hit, bool).ravel()
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        inside = which == b
        count = int(inside.sum())
        share = float(hit[inside].mean()) if count else None
        said = float(confidence[inside].mean()) if count else None
        if count:
            ece += count / len(confidence) * abs(share - said)
        table.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": count,
                      "accuracy": share, "confidence": said})  # fmt: skip
    return {"expected_calibration_error": float(ece), "bins": table}


def format_metrics(m: MulticlassMetrics) -> str:
    """A readable console report: summary, per-class table, confusion matrix."""
    absent = m.labels_not_measured
    macro = f"  macro accuracy      {m.macro_accuracy:.4f}"
    if absent:
        names = ", ".join(absent[:5]) + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")
        macro += (f"  ({len(m.labels) - len(absent)} of {len(m.labels)} labels; {names} "
                  f"{'has' if len(absent) == 1 else 'have'} no images here)")  # fmt: skip
    lines = [
        f"Evaluated on {m.count} images",
        f"  micro accuracy      {m.micro_accuracy:.4f}",
        macro,
        f"  log-loss            {m.log_loss:.4f}",
        f"  log-loss reduction  {m.log_loss_reduction:.4f}",
        "  top-k accuracy      " + "  ".join(f"top-{k}: {v:.4f}" for k, v in m.top_k_accuracy.items()),
        "",
    ]
    if m.unknown is not None:
        u = m.unknown
        accepted = "n/a" if u["accepted_accuracy"] is None else f"{u['accepted_accuracy']:.4f}"
        lines[-1:-1] = [f"  rejected as unknown {u['rejected']:.4f}  ({u['rejected_images']} of {m.count} images; "
                        f"accuracy on the other {m.count - u['rejected_images']}: {accepted})"]  # fmt: skip
    width = max(8, *(len(lbl) for lbl in m.labels))
    lines.append(f"  {'label':<{width}}  precision  recall  f1      support  log-loss")
    for label in m.labels:
        c = m.per_class[label]
        ll = m.per_class_log_loss.get(label)
        lines.append(
            f"  {label:<{width}}  {_cell(c['precision'], 9)}  {_cell(c['recall'], 6)}  {_cell(c['f1'], 6)}  "
            f"{c['support']:7d}  {_cell(ll, 8).strip()}"
        )
    lines += ["", "  confusion matrix (rows: true label, columns: predicted)"]
    cell = max(5, *(len(lbl) for lbl in m.labels))
    lines.append("  " + " " * width + "  " + " ".join(f"{lbl[:cell]:>{cell}}" for lbl in m.labels))
    for label, row in zip(m.labels, m.confusion_matrix):
        lines.append(f"  {label:<{width}}  " + " ".join(f"{v:>{cell}d}" for v in row))
    return "\n".join(lines)


def _cell(value: float | None, width: int) -> str:
    """A number of the table, or ``n/a`` where it was not measured."""
    return f"{'n/a':>{width}}" if value is None else f"{value:{width}.4f}"
