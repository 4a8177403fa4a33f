"""The report of a multi-label model: what fits answers that are sets of labels.

A confusion matrix and the calibration of the top probability do not fit a model that gives
each label its own probability. So its page shows what multi-label classifiers are judged by
(:mod:`imgclf.inference.multilabel`): mean average precision and F1 at the chosen thresholds,
a precision-recall curve per label with its threshold marked, the calibration of every
image-label probability (a label said with 0.8 should be on 80% of such images), and the
images whose sets were worst (the largest summed binary cross-entropy), with what was missed
and what was said wrongly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.data.images import ImageData, label_set
from imgclf.errors import DataError
from imgclf.inference.metrics import reliability
from imgclf.inference.multilabel import compute_multilabel_metrics, label_matrix, labels_over
from imgclf.inference.predictor import Predictor
from imgclf.insight.scored import score_images

#: Reliability bins of the image-label probabilities.
CALIBRATION_BINS = 10


@dataclass
class EvaluatedSets:
    """Per-image results of a multi-label model on images labelled with sets of labels."""

    files: list[str]
    probabilities: np.ndarray  # (n, labels): each label's own probability
    targets: np.ndarray  # (n, labels): 1 where the image has the label
    skipped: list[dict]


def evaluate_label_sets(model: Predictor, images: Sequence[ImageData]) -> EvaluatedSets:
    """Probabilities for every readable image; unreadable ones are listed, not fatal."""
    sets = [label_set(im) for im in images]
    unknown = sorted({name for names in sets for name in names} - set(model.labels))
    if unknown:
        raise DataError(f"the images have labels the model does not know: {', '.join(unknown)}")
    files, probs, kept, skipped = score_images(model, images)
    return EvaluatedSets(files, probs, label_matrix([sets[i] for i in kept], model.labels), skipped)


def label_calibration(probabilities: np.ndarray, targets: np.ndarray, bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """Reliability of every image-label probability: per bin, the share of those image-label
    pairs where the image has the label, against their mean probability; and the expected
    calibration error."""
    return reliability(probabilities, np.asarray(targets) > 0.5, bins)


def worst_sets(evaluated: EvaluatedSets, labels: Sequence[str], thresholds: Sequence[float], top: int) -> list[dict]:
    """The images with the highest loss (binary cross-entropy summed over labels), worst first:
    the labels they have, the labels the model said (at its thresholds), and the difference."""
    p = np.clip(evaluated.probabilities, 1e-15, 1 - 1e-15)
    y = evaluated.targets > 0.5
    losses = -(np.where(y, np.log(p), np.log1p(-p))).sum(1)
    order = np.argsort(-losses, kind="stable")[:top]
    worst = []
    for i in order:
        true = [labels[j] for j in np.flatnonzero(y[i])]
        said = [name for name, _ in labels_over(evaluated.probabilities[i], thresholds, labels)]
        worst.append({"file": evaluated.files[i], "true": true, "predicted": said,
                      "missed": [x for x in true if x not in said], "extra": [x for x in said if x not in true],
                      "loss": float(losses[i])})  # fmt: skip
    return worst


def add_evaluation(model: Predictor, images: Sequence[ImageData] | None, out: Path, data: dict, charts: dict,
                   top: int) -> EvaluatedSets | None:  # fmt: skip
    """Fill the report's ``data`` and ``charts`` for a multi-label model: its metrics (from the
    images, else the model file's held-out ones), the precision-recall curves, calibration and
    worst sets where there are per-image results. Returns those results (None without images)."""
    from imgclf.insight import plots

    labels = list(model.labels)
    evaluated = evaluate_label_sets(model, images) if images else None
    if evaluated is not None:
        data["metrics"] = compute_multilabel_metrics(evaluated.probabilities, evaluated.targets, labels,
                                                     model.thresholds).to_dict()  # fmt: skip
        data["metrics_from"] = f"{len(evaluated.files)} images given to the report"
        charts["precision_recall"] = plots.precision_recall_curves(
            evaluated.probabilities, evaluated.targets, labels, model.thresholds, out / "precision_recall.png"
        ).name
        data["calibration"] = label_calibration(evaluated.probabilities, evaluated.targets)
        charts["calibration"] = plots.reliability_diagram(
            data["calibration"]["bins"], data["calibration"]["expected_calibration_error"], out / "calibration.png",
            binned="probability of each label", right="share of images that have it",
            counted="image-label pairs").name  # fmt: skip
        data["top_losses"] = worst_sets(evaluated, labels, model.thresholds, top)
        data["skipped"] = evaluated.skipped
    return evaluated


def _names(names: Sequence[str]) -> str:
    return escape(", ".join(names)) if names else "<i>none</i>"


def evaluation_html(data: dict[str, Any]) -> str:
    """The page's evaluation section for a multi-label model."""
    m, charts = data["metrics"], data["charts"]
    parts = [f"<p>On {escape(data['metrics_from'])}: mean average precision <b>{_num(m['mean_average_precision'])}"
             f"</b>, micro F1 <b>{m['micro_f1']:.4f}</b> (precision {m['micro_precision']:.4f}, recall "
             f"{m['micro_recall']:.4f}), macro F1 {_num(m['macro_f1'])}, hamming loss {m['hamming_loss']:.4f}, "
             f"exact sets {m['subset_accuracy']:.4f}.</p>"]  # fmt: skip
    rows = "".join(f"<tr><td>{escape(label)}</td><td class='num'>{_num(c['average_precision'])}</td>"
                   f"<td class='num'>{_num(c['precision'])}</td><td class='num'>{_num(c['recall'])}</td>"
                   f"<td class='num'>{_num(c['f1'])}</td><td class='num'>{c['threshold']:.2f}</td>"
                   f"<td class='num'>{c['support']}</td></tr>" for label, c in m["per_label"].items())  # fmt: skip
    if m.get("labels_not_measured"):
        rows += (f"<tr><td colspan='7' class='muted'>n/a: not measured, no image of "
                 f"{escape(', '.join(m['labels_not_measured']))} here; the means leave them out</td></tr>")  # fmt: skip
    table = ("<table><tr><th>label</th><th>average precision</th><th>precision</th><th>recall</th><th>F1</th>"
             f"<th>threshold</th><th>images</th></tr>{rows}</table>")  # fmt: skip
    curves = (f"<img class='chart' src='{charts['precision_recall']}' alt='precision-recall curve per label'>"
              if "precision_recall" in charts else "")  # fmt: skip
    parts.append(f"<div class='charts'>{curves}<div>{table}<p class='muted'>A label is said when its probability "
                 "reaches its threshold, chosen at training for the best F1 on images the head never saw.</p>"
                 "</div></div>")  # fmt: skip
    return "".join(parts)


def calibration_html(data: dict[str, Any]) -> str:
    ece = data["calibration"]["expected_calibration_error"]
    return (f"<img class='chart' src='{data['charts']['calibration']}' alt='reliability diagram'>"
            f"<p>Expected calibration error <b>{ece:.3f}</b>: on average a label's probability is "
            f"{ece * 100:.1f} points away from how often the image has that label.</p>")  # fmt: skip


def worst_caption(item: dict) -> str:
    """A worst set's card caption: the labels it has, what was said, what was missed or extra."""
    caption = f"has <b>{_names(item['true'])}</b><br>said <b>{_names(item['predicted'])}</b>"
    if item["missed"]:
        caption += f"<br>missed {_names(item['missed'])}"
    if item["extra"]:
        caption += f"<br>wrongly said {_names(item['extra'])}"
    return caption + f"<br>loss {item['loss']:.2f}"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
