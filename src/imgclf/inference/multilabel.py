"""Multi-label evaluation and thresholds: what fits a model that answers a set of labels.

A multi-label model gives each label its own (sigmoid) probability; an image has every label
whose probability reaches that label's threshold. Accuracy and a confusion matrix do not fit
such answers, so a multi-label model is measured as multi-label classifiers are: mean average
precision (ranking quality, threshold-free), micro and macro F1 at the thresholds, per-label
precision, recall and average precision, and the hamming loss (the share of image-label
decisions that are wrong).

Numpy only, so the torch-free runtime evaluates exactly like training does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: The thresholds tried for each label (a finer grid overfits the few validation images a label has).
THRESHOLD_GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)
DEFAULT_THRESHOLD = 0.5


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """The logistic function, without overflow for large negative logits."""
    e = np.exp(-np.abs(logits))
    return np.where(logits >= 0, 1 / (1 + e), e / (1 + e))


def labels_over(probabilities: np.ndarray, thresholds: Sequence[float], labels: Sequence[str]) -> list[tuple[str, float]]:
    """A multi-label answer for one image: each label whose probability reaches its threshold,
    with that probability, most likely first (possibly none)."""
    order = np.argsort(-probabilities, kind="stable")
    return [(labels[i], float(probabilities[i])) for i in order if probabilities[i] >= thresholds[i]]


def torch_probabilities(logits, multilabel: bool):
    """The head's logits as probabilities in a torch graph: a sigmoid per label for a
    multi-label model, else the softmax over labels."""
    import torch

    return torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)


def label_matrix(label_sets: Sequence[Sequence[str]], labels: Sequence[str]) -> np.ndarray:
    """(images, labels) 0/1 float32: whether each image has each label."""
    index = {label: i for i, label in enumerate(labels)}
    y = np.zeros((len(label_sets), len(labels)), np.float32)
    for row, names in enumerate(label_sets):
        for name in names:
            y[row, index[name]] = 1.0
    return y


def _f1(tp: float, fp: float, fn: float) -> float:
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def choose_thresholds(probabilities: np.ndarray, targets: np.ndarray) -> list[float]:
    """Per label, the threshold of :data:`THRESHOLD_GRID` with the best F1 on these images (ties:
    the one nearest 0.5); 0.5 for a label none of them has, since nothing can be learned there."""
    chosen = []
    for j in range(targets.shape[1]):
        y, p = targets[:, j] > 0.5, probabilities[:, j]
        if not y.any():
            chosen.append(DEFAULT_THRESHOLD)
            continue
        best, best_t = -1.0, DEFAULT_THRESHOLD
        for t in sorted(THRESHOLD_GRID, key=lambda t: abs(t - DEFAULT_THRESHOLD)):
            answered = p >= t
            score = _f1(float((answered & y).sum()), float((answered & ~y).sum()), float((~answered & y).sum()))
            if score > best + 1e-12:
                best, best_t = score, float(t)
        chosen.append(best_t)
    return chosen


def average_precision(scores: np.ndarray, relevant: np.ndarray) -> float | None:
    """The area under the precision-recall curve as scikit-learn's ``average_precision_score``
    computes it (sum of precision x recall steps, tied scores taken together); None without a
    relevant image."""
    relevant = relevant > 0.5
    if not relevant.any():
        return None
    order = np.argsort(-scores, kind="stable")
    s, r = scores[order], relevant[order]
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp = np.cumsum(r)[last_of_tie]
    answered = last_of_tie + 1
    precision, recall = tp / answered, tp / r.sum()
    steps = np.diff(np.r_[0.0, recall])
    return float((steps * precision).sum())


@dataclass
class MultilabelMetrics:
    """Metrics of a multi-label classifier on labelled images (``labels[i]`` is column ``i``).

    ``per_label`` holds each label's precision, recall, F1 (at its threshold), average precision,
    threshold and support (images that have it); a label none of the images has is not measured
    (recall, F1 and average precision None) and is left out of the means."""

    labels: list[str]
    mean_average_precision: float | None
    micro_f1: float
    macro_f1: float | None
    micro_precision: float
    micro_recall: float
    hamming_loss: float
    subset_accuracy: float  # images whose whole set of labels is exactly right
    per_label: dict[str, dict[str, float | None]]
    count: int

    @property
    def labels_not_measured(self) -> list[str]:
        return [label for label in self.labels if not self.per_label[label]["support"]]

    def to_dict(self) -> dict:
        return {
            "multilabel": True,
            "mean_average_precision": self.mean_average_precision,
            "micro_f1": self.micro_f1,
            "macro_f1": self.macro_f1,
            "micro_precision": self.micro_precision,
            "micro_recall": self.micro_recall,
            "hamming_loss": self.hamming_loss,
            "subset_accuracy": self.subset_accuracy,
            "labels": self.labels,
            "per_label": self.per_label,
            "labels_not_measured": self.labels_not_measured,
            "count": self.count,
        }

    def __str__(self) -> str:
        return format_multilabel_metrics(self)


def compute_multilabel_metrics(probabilities: np.ndarray, targets: np.ndarray, labels: Sequence[str],
                               thresholds: Sequence[float]) -> MultilabelMetrics:  # fmt: skip
    """Metrics of (images, labels) ``probabilities`` against 0/1 ``targets`` at ``thresholds``."""
    probabilities = np.asarray(probabilities, np.float64)
    y = np.asarray(targets) > 0.5
    answered = probabilities >= np.asarray(thresholds, np.float64)[None, :]
    tp, fp, fn = (answered & y).sum(0), (answered & ~y).sum(0), (~answered & y).sum(0)
    per_label: dict[str, dict[str, float | None]] = {}
    for j, label in enumerate(labels):
        support = int(y[:, j].sum())
        said = int(answered[:, j].sum())
        per_label[label] = {
            "precision": float(tp[j] / said) if said else (0.0 if support else None),
            "recall": float(tp[j] / support) if support else None,
            "f1": _f1(float(tp[j]), float(fp[j]), float(fn[j])) if support else None,
            "average_precision": average_precision(probabilities[:, j], y[:, j]),
            "threshold": float(thresholds[j]),
            "support": support,
        }
    measured = [v for v in per_label.values() if v["support"]]
    total_tp, total_fp, total_fn = float(tp.sum()), float(fp.sum()), float(fn.sum())
    return MultilabelMetrics(
        labels=list(labels),
        mean_average_precision=float(np.mean([v["average_precision"] for v in measured])) if measured else None,
        micro_f1=_f1(total_tp, total_fp, total_fn),
        macro_f1=float(np.mean([v["f1"] for v in measured])) if measured else None,
        micro_precision=total_tp / (total_tp + total_fp) if total_tp + total_fp else 0.0,
        micro_recall=total_tp / (total_tp + total_fn) if total_tp + total_fn else 0.0,
        hamming_loss=float((answered != y).mean()) if y.size else 0.0,
        subset_accuracy=float((answered == y).all(1).mean()) if len(y) else 0.0,
        per_label=per_label,
        count=int(len(y)),
    )


def _cell(value: float | None, width: int = 9) -> str:
    return f"{'n/a' if value is None else f'{value:.4f}':>{width}}"


def format_multilabel_metrics(m: MultilabelMetrics) -> str:
    """A readable console report: the summary, then one line per label."""
    lines = [
        f"Multi-label metrics on {m.count} images:",
        f"  mean average precision: {_cell(m.mean_average_precision, 0)}",
        f"  micro F1:               {m.micro_f1:.4f} (precision {m.micro_precision:.4f}, recall {m.micro_recall:.4f})",
        f"  macro F1:               {_cell(m.macro_f1, 0)}",
        f"  hamming loss:           {m.hamming_loss:.4f}",
        f"  exact sets:             {m.subset_accuracy:.4f}",
        "",
    ]
    width = max([5, *(len(label) for label in m.labels)])
    lines.append(f"  {'label':<{width}} {'precision':>9} {'recall':>9} {'f1':>9} {'avg prec':>9} {'threshold':>9} "
                 f"{'support':>7}")  # fmt: skip
    for label in m.labels:
        v = m.per_label[label]
        lines.append(f"  {label:<{width}} {_cell(v['precision'])} {_cell(v['recall'])} {_cell(v['f1'])} "
                     f"{_cell(v['average_precision'])} {v['threshold']:>9.2f} {v['support']:>7}")  # fmt: skip
    if m.labels_not_measured:
        lines.append(f"  (no image of {', '.join(m.labels_not_measured)}: not measured, left out of the means)")
    return "\n".join(lines)
