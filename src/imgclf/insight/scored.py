"""The report's per-image results: each readable labelled image's probabilities.

Shared by the single-label report (:mod:`imgclf.insight.report`) and the multi-label one
(:mod:`imgclf.insight.label_sets`): an unreadable image is listed with its reason, never fatal,
and the rest keep their order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from imgclf.data.images import ImageData
from imgclf.errors import DataError, ImageDecodeError
from imgclf.inference.predictor import Predictor


def score_images(model: Predictor, images: Sequence[ImageData]) -> tuple[list[str], np.ndarray, list[int], list[dict]]:
    """(file names, (n, labels) probabilities in the model's label order, the positions in
    ``images`` of those scored, the unreadable ones as ``{"file", "reason"}``)."""
    files, probs, kept, skipped = [], [], [], []
    for i, (name, outcome) in enumerate(model.iter_predictions((im.source, im.name) for im in images)):
        if isinstance(outcome, ImageDecodeError):
            skipped.append({"file": name, "reason": str(outcome)})
            continue
        files.append(name)
        probs.append([outcome.scores[label] for label in model.labels])
        kept.append(i)
    if not files:
        raise DataError("no readable images to evaluate the model on")
    return files, np.asarray(probs), kept, skipped
