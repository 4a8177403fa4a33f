"""The training report: one offline page that shows how a model learned and where it fails.

From the model file alone: training curves (its per-epoch history) and the
confusion matrix of its held-out evaluation. Given labelled images, the model
is evaluated on them, which adds per-image results: the confusion matrix of
those images, calibration (a reliability diagram and the expected calibration
error) and the top losses (fastai's ``plot_top_losses``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.data.images import ImageData, is_multilabel
from imgclf.errors import DataError, ImageDecodeError
from imgclf.inference.metrics import compute_metrics, reliability
from imgclf.inference.predictor import SETS_FOR_A_SINGLE_LABEL_MODEL, Predictor
from imgclf.insight.pages import Thumbnails, card, check_page_folder, page, page_folder, write_page
from imgclf.insight.scored import score_images

CALIBRATION_BINS = 10
TOP_LOSSES = 16


@dataclass
class Evaluated:
    """Per-image results of a model on labelled images."""

    files: list[str]
    probabilities: np.ndarray  # (n, classes)
    targets: np.ndarray  # (n,)
    skipped: list[dict]


def evaluate_images(model: Predictor, images: Sequence[ImageData]) -> Evaluated:
    """Probabilities for every readable labelled image; unreadable ones are listed, not fatal."""
    if is_multilabel(images):
        raise DataError(SETS_FOR_A_SINGLE_LABEL_MODEL)
    unknown = sorted({im.label for im in images if im.label not in model.labels})
    if unknown:
        raise DataError(f"the images have labels the model does not know: {', '.join(map(str, unknown))}")
    files, probs, kept, skipped = score_images(model, images)
    targets = [model.labels.index(images[i].label) for i in kept]
    return Evaluated(files, probs, np.asarray(targets), skipped)


def calibration(probabilities: np.ndarray, targets: np.ndarray, bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """Reliability bins of the top probability and the expected calibration error (their weighted gap)."""
    return reliability(probabilities.max(1), probabilities.argmax(1) == targets, bins)


def most_confused(matrix: Sequence[Sequence[int]], labels: Sequence[str], top: int = 5) -> list[dict]:
    """The largest off-diagonal cells: (true, predicted, images)."""
    cells = [(int(matrix[i][j]), labels[i], labels[j]) for i in range(len(labels)) for j in range(len(labels))
             if i != j and matrix[i][j] > 0]  # fmt: skip
    return [
        {"true": t, "predicted": p, "images": n} for n, t, p in sorted(cells, key=lambda c: (-c[0], c[1], c[2]))[:top]
    ]


def top_losses(evaluated: Evaluated, labels: Sequence[str], top: int = TOP_LOSSES) -> list[dict]:
    """The images with the highest cross-entropy loss, worst first."""
    p_true = evaluated.probabilities[np.arange(len(evaluated.targets)), evaluated.targets]
    losses = -np.log(np.clip(p_true, 1e-15, 1.0))
    order = np.argsort(-losses, kind="stable")[:top]
    return [{"file": evaluated.files[i], "true": labels[evaluated.targets[i]],
             "predicted": labels[int(evaluated.probabilities[i].argmax())],
             "probability": float(evaluated.probabilities[i].max()), "true_probability": float(p_true[i]),
             "loss": float(losses[i])} for i in order]  # fmt: skip


def check_outside_inputs(out: Path, images: Sequence[ImageData], option: str = "--out") -> None:
    """Refuse a report folder inside a folder whose subfolders are the labels of the images: its
    charts and thumbnails would be read as a new label (or as more photos of one) by the next
    train. Images a manifest lists are not such a folder's (the next train reads the manifest)."""
    check_page_folder(out, "report", inside=_label_folders(images), option=option)


def _label_folders(images: Sequence[ImageData]) -> tuple[Path, ...]:
    """The folders whose subfolders are the labels of ``images`` (not a manifest's folders)."""
    return tuple({Path(im.source).parent.resolve().parent for im in images
                  if isinstance(im.source, Path) and im.label and Path(im.source).parent.name == im.label})  # fmt: skip


def write_report(
    model: Predictor, images: Sequence[ImageData] | None = None, out: str | Path = "report", *, name: str = "model"
) -> Path:
    """Write ``out/index.html``, its charts as PNG and the numbers as ``out/report.json``; returns the page.

    Without ``images`` the page shows what the model file holds (history, held-out metrics).
    Images that cannot be read are left out of every number, listed on the page (and in
    ``report.json``'s ``skipped``) and counted in one warning. A multi-label model's page
    shows what fits sets of labels (:mod:`imgclf.insight.label_sets`). A report that fails leaves
    no folder behind.
    """
    out = Path(out)
    images = _as_report_images(images)
    with page_folder(out, "report", inside=_label_folders(images or ())):
        return _write_report(model, images, out, name)


def _as_report_images(images: Any) -> list[ImageData] | None:
    """What ``evaluate`` takes, as ``ImageData``: a folder or manifest (its test part when it has
    one), a DataFrame with path and label columns, paths labelled by their folder, bytes."""
    from imgclf.data.inputs import encoded_image_data, labelled_items
    from imgclf.data.layouts import evaluation_images, load_dataset

    if images is None or (isinstance(images, (list, tuple)) and all(isinstance(im, ImageData) for im in images)):
        return images
    if isinstance(images, (str, Path)):
        return evaluation_images(load_dataset(images, for_training=False))[0]
    return encoded_image_data(labelled_items(images, None, "write_report")[0],
                              "write_report shows files or encoded bytes: give paths, bytes, a folder, a manifest "
                              "or a DataFrame of paths")  # fmt: skip


def _write_report(model: Predictor, images: Sequence[ImageData] | None, out: Path, name: str) -> Path:
    from imgclf.insight import label_sets, plots

    labels = list(model.labels)
    history = list(model.info.get("history") or [])
    metrics = model.info.get("metrics")
    data: dict[str, Any] = {"model": name, "labels": labels, "multilabel": model.multilabel, "history": history,
                            "metrics": metrics, "metrics_from": "the held-out images of training (from the model file)"
                            if metrics else None, "ran": None}  # fmt: skip
    charts: dict[str, str] = {}
    if history:
        charts["curves"] = plots.training_curves(history, out / "curves.png").name
    if model.multilabel:
        evaluated = label_sets.add_evaluation(model, images, out, data, charts, TOP_LOSSES)
    else:
        evaluated = _add_evaluation(model, images, out, data, charts)
    if evaluated is not None:
        data["ran"] = model.engine_choice(len(images)).to_dict()
        if evaluated.skipped:
            warnings.warn(f"left {len(evaluated.skipped)} unreadable image(s) out of the report (e.g. "
                          f"{evaluated.skipped[0]['file']}); they are listed on the page", stacklevel=2)  # fmt: skip
        _draw_top_losses(model, data, charts, out)
    data["charts"] = charts
    (out / "report.json").write_text(json.dumps(data, indent=2))
    return write_page(out / "index.html", page(f"imgclf report: {name}", _body(data, Thumbnails(out))))


def _add_evaluation(model: Predictor, images: Sequence[ImageData] | None, out: Path, data: dict,
                    charts: dict) -> Evaluated | None:  # fmt: skip
    """A single-label model's metrics (from the images, else the model file's held-out ones), its
    confusion matrix, and calibration and top losses where there are per-image results."""
    from imgclf.insight import plots

    labels = list(model.labels)
    evaluated = evaluate_images(model, images) if images else None
    if evaluated is not None:
        data["metrics"] = compute_metrics(evaluated.probabilities, evaluated.targets, labels).to_dict()
        data["metrics_from"] = f"{len(evaluated.files)} images given to the report"
    if data["metrics"]:
        matrix = data["metrics"]["confusion_matrix"]
        charts["confusion"] = plots.confusion_matrices(np.array(matrix), labels, out / "confusion.png").name
        data["most_confused"] = most_confused(matrix, labels)
    if evaluated is not None:
        data["calibration"] = calibration(evaluated.probabilities, evaluated.targets)
        charts["calibration"] = plots.reliability_diagram(data["calibration"]["bins"],
                                                          data["calibration"]["expected_calibration_error"],
                                                          out / "calibration.png").name  # fmt: skip
        data["top_losses"] = top_losses(evaluated, labels)
        data["skipped"] = evaluated.skipped
    return evaluated


def _draw_top_losses(model: Predictor, data: dict, charts: dict, out: Path) -> None:
    """The top losses as one picture, and under each the overlay of what the model looked at."""
    from imgclf.data.imaging import open_image
    from imgclf.insight import plots
    from imgclf.insight.explained import overlay_thumbnails

    pictures = []
    for item in data["top_losses"]:
        try:
            picture = open_image(item["file"], item["file"], draft_size=256)
            picture.thumbnail((256, 256))
        except ImageDecodeError:
            picture = None
        pictures.append(picture)
    drawn = data["top_losses"]
    if data["multilabel"]:  # sets of labels: what it has and what was said
        drawn = [{**t, "title": f"has {', '.join(t['true']) or 'none'}\nsaid {', '.join(t['predicted']) or 'none'}, "
                                f"loss {t['loss']:.2f}"} for t in drawn]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        charts["top_losses"] = plots.top_losses(drawn, pictures, out / "top_losses.png").name
    for item, url in _matched(data["top_losses"], overlay_thumbnails(model, [t["file"] for t in data["top_losses"]],
                                                                     out)):  # fmt: skip
        item["overlay"] = url


def _matched(items: list[dict], urls: dict[str, str]):
    """(item, overlay URL) for each top loss that has an overlay."""
    return [(item, urls[item["file"]]) for item in items if item["file"] in urls]


def _cpu_words(capabilities: str) -> str:
    """The CPU capabilities that decide the precision, as the page says them ("none" read as no capabilities at all)."""
    return "a CPU without native bf16 or VNNI" if capabilities == "none" else f"CPU with {escape(capabilities)}"


def _number(value: float | None) -> str:
    """A metric on the page, or n/a where it was not measured (a label without images)."""
    return "n/a" if value is None else f"{value:.3f}"


def _body(data: dict[str, Any], thumbs: Thumbnails) -> str:
    from imgclf.insight import label_sets

    charts, multilabel = data["charts"], data["multilabel"]
    kind = "; multi-label: an image has a set of them" if multilabel else ""
    parts = [f"<h1>Training report</h1><p class='muted'>{escape(data['model'])}: "
             f"{len(data['labels'])} labels ({escape(', '.join(data['labels']))}){kind}</p>"]  # fmt: skip
    parts.append("<h2>Training curves</h2>")
    if "curves" in charts:
        phases = {h.get("phase", "head") for h in data["history"]}
        parts.append(f"<img class='chart' src='{charts['curves']}' alt='training curves'>"
                     f"<p class='muted'>{len(data['history'])} epochs ({escape(', '.join(sorted(phases)))}).</p>")  # fmt: skip
    else:
        parts.append("<p class='muted'>This model file holds no per-epoch history.</p>")
    parts.append("<h2>Evaluation</h2>")
    if not data["metrics"]:
        parts.append("<p class='muted'>No evaluation: the model file holds no held-out metrics; give labelled "
                     "images to evaluate on.</p>")  # fmt: skip
    else:
        if data.get("ran"):
            r = data["ran"]
            parts.append(f"<p class='muted'>Scored by {escape(r['engine'])} at {escape(r['precision'])} "
                         f"({_cpu_words(r['cpu'])}).</p>")  # fmt: skip
        parts.append(label_sets.evaluation_html(data) if multilabel else _evaluation_html(data))
    if data.get("skipped"):
        items = "".join(f"<li><code>{escape(item['file'])}</code>: {escape(item['reason'])}</li>"
                        for item in data["skipped"])  # fmt: skip
        parts.append(f"<h3>Unreadable images</h3><p class='muted'>{len(data['skipped'])} image(s) of the folder "
                     f"could not be read and are left out of every number on this page:</p><ul>{items}</ul>")  # fmt: skip
    parts.append("<h2>Calibration</h2>")
    if "calibration" not in charts:
        parts.append("<p class='muted'>Needs per-image results: give labelled images.</p>")
    elif multilabel:
        parts.append(label_sets.calibration_html(data))
    else:
        ece = data["calibration"]["expected_calibration_error"]
        parts.append(f"<img class='chart' src='{charts['calibration']}' alt='reliability diagram'>"
                     f"<p>Expected calibration error <b>{ece:.3f}</b>: on average the predicted label's "
                     f"probability is {ece * 100:.1f} points away from how often it is right.</p>")  # fmt: skip
    parts.append("<h2>Top losses</h2>")
    if data.get("top_losses"):
        parts.append("<div class='cards'>" + "".join(card(thumbs, t["file"], _loss_caption(t, multilabel))
                                                     for t in data["top_losses"]) + "</div>")  # fmt: skip
        if any(t.get("overlay") for t in data["top_losses"]):
            which = "its most likely label" if multilabel else "the label it predicted"
            parts.append(f"<p class='muted'>Under each photo, what the model looked at for {which}: its class "
                         "activation map, red where the evidence was strongest.</p>")  # fmt: skip
        parts.append(f"<p class='muted'>As one picture: <a href='{charts['top_losses']}'>top_losses.png</a>; "
                     "the numbers: <a href='report.json'>report.json</a>.</p>")  # fmt: skip
    else:
        parts.append("<p class='muted'>Needs per-image results: give labelled images.</p>")
    return "".join(parts)


def _evaluation_html(data: dict[str, Any]) -> str:
    """The evaluation section of a single-label model: accuracy, the per-label table, the
    confusion matrix and the most confused pairs."""
    metrics, charts = data["metrics"], data["charts"]
    summary = (f"<p>On {escape(data['metrics_from'])}: accuracy <b>{metrics['micro_accuracy']:.4f}</b> "
               f"(macro {metrics['macro_accuracy']:.4f}), log-loss {metrics['log_loss']:.4f}.</p>")  # fmt: skip
    rows = "".join(f"<tr><td>{escape(label)}</td><td class='num'>{_number(c['precision'])}</td>"
                   f"<td class='num'>{_number(c['recall'])}</td><td class='num'>{_number(c['f1'])}</td>"
                   f"<td class='num'>{c['support']}</td></tr>" for label, c in metrics["per_class"].items())  # fmt: skip
    absent = [label for label, c in metrics["per_class"].items() if not c["support"]]
    if absent:
        rows += (f"<tr><td colspan='5' class='muted'>n/a: not measured, no image of {escape(', '.join(absent))} "
                 "here; the macro accuracy leaves them out</td></tr>")  # fmt: skip
    confused = "".join(f"<tr><td>{escape(c['true'])}</td><td>{escape(c['predicted'])}</td>"
                       f"<td class='num'>{c['images']}</td></tr>" for c in data.get("most_confused", []))  # fmt: skip
    return (summary + f"<div class='charts'><img class='chart' src='{charts['confusion']}' alt='confusion matrix'>"
            f"<div><table><tr><th>label</th><th>precision</th><th>recall</th><th>F1</th><th>images</th>"
            f"</tr>{rows}</table><h3>Most confused</h3>"
            + (f"<table><tr><th>true</th><th>predicted as</th><th>images</th></tr>{confused}</table>"
               if confused else "<p class='muted'>No mistakes.</p>") + "</div></div>")  # fmt: skip


def _loss_caption(item: dict, multilabel: bool) -> str:
    """A top loss's card caption, with the overlay of what the model looked at under it."""
    from imgclf.insight.label_sets import worst_caption

    if multilabel:
        caption = worst_caption(item)
    else:
        caption = (f"true <b>{escape(item['true'])}</b>, predicted <b>{escape(item['predicted'])}</b> "
                   f"{item['probability']:.2f}<br>p(true) {item['true_probability']:.2f}, loss {item['loss']:.2f}")  # fmt: skip
    if item.get("overlay"):
        looked = item["predicted"][0] if multilabel and item["predicted"] else item["predicted"]
        caption += f"<img class='overlay' src='{escape(item['overlay'])}' alt='what it looked at for {escape(str(looked))}'>"
    return caption
