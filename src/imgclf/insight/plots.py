"""The report's charts, drawn with matplotlib's object API on the Agg canvas.

Only this module imports matplotlib, and it never touches ``pyplot``: no
global backend is switched, so a user's own plotting session is left alone
and nothing needs a display. Each function writes one PNG and returns it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

DPI = 110


def _figure(width: float, height: float, layout: str | None = None):
    """A figure on its own Agg canvas; margins are set by hand where a layout engine would cost seconds."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        from imgclf.errors import MissingDependencyError
        from imgclf.options import install_hint

        raise MissingDependencyError(f"the report's charts need matplotlib: {install_hint('insight')}") from None
    figure = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path) -> Path:
    from imgclf.atomic import atomic_path

    with atomic_path(path, "chart") as tmp:
        figure.savefig(tmp, format="png")
    return path


def training_curves(history: Sequence[dict], path: Path) -> Path:
    """Loss and accuracy per epoch, training and validation, head and fine-tune phases one after the other."""
    figure = _figure(10, 3.8)
    figure.subplots_adjust(left=0.06, right=0.985, bottom=0.13, top=0.91, wspace=0.18)
    loss_ax, acc_ax = figure.subplots(1, 2)
    x = np.arange(1, len(history) + 1)
    phases = [h.get("phase", "head") for h in history]
    for ax, key, title in ((loss_ax, "loss", "Loss"), (acc_ax, "accuracy", "Accuracy")):
        ax.plot(x, [h[f"train_{key}"] for h in history], label="training", color="#1f77b4")
        val = [h.get(f"validation_{key}") for h in history]
        if any(v is not None for v in val):
            ax.plot(x, [np.nan if v is None else v for v in val], label="validation", color="#d62728")
        if "fine-tune" in phases:
            start = phases.index("fine-tune") + 0.5
            ax.axvspan(start, len(history) + 0.5, color="#f2e6ff", zorder=0, label="fine-tune")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    acc_ax.set_ylim(min(0.0, acc_ax.get_ylim()[0]), 1.02)
    return _save(figure, path)


def confusion_matrices(matrix: np.ndarray, labels: Sequence[str], path: Path) -> Path:
    """Counts and row-normalised (share of each true label) heatmaps, side by side."""
    matrix = np.asarray(matrix)
    k = len(labels)
    side = max(4.0, 0.55 * k + 2.2)
    figure = _figure(2 * side, side, layout="constrained")  # rotated labels and colour bars: let it place them
    axes = figure.subplots(1, 2)
    rows = matrix.sum(1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros_like(matrix, dtype=float), where=rows > 0)
    for ax, values, title, fmt in (
        (axes[0], matrix, "Counts", "d"),
        (axes[1], normalised, "Share of true label", ".2f"),
    ):
        image = ax.imshow(values, cmap="Blues", vmin=0, vmax=values.max() if values.max() > 0 else 1)
        ax.set_title(title)
        ax.set_xticks(range(k), labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), labels, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if k <= 30:
            top = values.max() if values.max() > 0 else 1
            for i in range(k):
                for j in range(k):
                    colour = "white" if values[i, j] > 0.6 * top else "black"
                    ax.text(j, i, format(values[i, j], fmt), ha="center", va="center", fontsize=7, color=colour)
        figure.colorbar(image, ax=ax, shrink=0.8)
    return _save(figure, path)


def reliability_diagram(bins: Sequence[dict], ece: float, path: Path, *,
                        binned: str = "probability of the predicted label", right: str = "accuracy",
                        counted: str = "images") -> Path:  # fmt: skip
    """Accuracy against confidence per bin (a calibrated model follows the diagonal), counts below;
    the axis words say what was binned (a multi-label model bins every image-label probability)."""
    figure = _figure(5.2, 5.6)
    figure.subplots_adjust(left=0.13, right=0.97, bottom=0.09, top=0.94, hspace=0.06)
    top, bottom = figure.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    width = 1.0 / len(bins)
    lefts = [b["low"] for b in bins]
    accuracy = [b["accuracy"] if b["count"] else 0 for b in bins]
    confidence = [b["confidence"] if b["count"] else 0 for b in bins]
    top.bar(lefts, accuracy, width=width, align="edge", color="#1f77b4", edgecolor="white", label=right)
    low, high = np.minimum(accuracy, confidence), np.maximum(accuracy, confidence)
    top.bar(lefts, high - low, bottom=low, width=width, align="edge", facecolor="none", edgecolor="#d62728",
            hatch="//", linewidth=0.8, label="gap to mean confidence")  # fmt: skip
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfectly calibrated")
    top.set_ylim(0, 1)
    top.set_xlim(0, 1)
    top.set_ylabel(right)
    top.set_title(f"Reliability (expected calibration error {ece:.3f})")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(lefts, [b["count"] for b in bins], width=width, align="edge", color="#7f7f7f", edgecolor="white")
    bottom.set_xlabel(f"confidence ({binned})")
    bottom.set_ylabel(counted)
    return _save(figure, path)


def top_losses(items: Sequence[dict], pictures: Sequence, path: Path, columns: int = 4) -> Path:
    """fastai's plot_top_losses: the worst-scored images with true / predicted label and probability
    (or the item's own ``title``)."""
    rows = max(1, int(np.ceil(len(items) / columns)))
    shapes = [p.size for p in pictures if p is not None]
    tall = min(1.0, float(np.median([h / w for w, h in shapes]))) if shapes else 1.0  # wide pictures: lower rows
    row = 3.0 * tall + 0.3
    figure = _figure(3.0 * columns, row * rows)
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.45 / (row * rows), hspace=0.35, wspace=0.05)
    axes = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, item, picture in zip(axes, items, pictures):
        if picture is not None:
            ax.imshow(np.asarray(picture))
        title = item.get("title") or (f"true {item['true']} / predicted {item['predicted']}\n"
                                      f"p(true) {item['true_probability']:.2f}, loss {item['loss']:.2f}")  # fmt: skip
        ax.set_title(title, fontsize=8)
    return _save(figure, path)


def precision_recall_curves(probabilities: np.ndarray, targets: np.ndarray, labels: Sequence[str],
                            thresholds: Sequence[float], path: Path) -> Path:  # fmt: skip
    """A multi-label model's precision against recall per label, as the label's threshold falls,
    with its average precision in the legend and a dot where its chosen threshold sits."""
    from imgclf.inference.multilabel import average_precision

    figure = _figure(5.6, 4.6)
    figure.subplots_adjust(left=0.12, right=0.97, bottom=0.11, top=0.93)
    ax = figure.subplots()
    colours = [f"C{i % 10}" for i in range(len(labels))]
    for j, label in enumerate(labels):
        relevant = np.asarray(targets)[:, j] > 0.5
        if not relevant.any():
            continue
        scores = np.asarray(probabilities)[:, j]
        order = np.argsort(-scores, kind="stable")
        hits = np.cumsum(relevant[order])
        precision, recall = hits / np.arange(1, len(order) + 1), hits / relevant.sum()
        ap = average_precision(scores, relevant)
        ax.step(np.r_[0.0, recall], np.r_[1.0, precision], where="post", color=colours[j],
                label=f"{label} (AP {ap:.2f})")  # fmt: skip
        said = scores >= thresholds[j]
        if said.any():
            ax.plot(relevant[said].sum() / relevant.sum(), relevant[said].mean(), "o", color=colours[j])
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("Precision-recall per label (dot: its threshold)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return _save(figure, path)
