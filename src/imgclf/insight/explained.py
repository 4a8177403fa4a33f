"""What the model looked at, for the report's top losses: overlays of the class activation map.

A top loss says the model was wrong; the overlay says where it found the evidence for its
wrong answer (a background, a second object, a watermark), which is what one fixes the
data for. The map is the predicted label's (:mod:`imgclf.inference.explain`), laid on a
thumbnail: at that size the crop's geometry is the full image's, scaled.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from imgclf.data.imaging import load_array, open_image
from imgclf.errors import ImageDecodeError
from imgclf.inference.explain import full_size_map, overlay
from imgclf.inference.predictor import Predictor

OVERLAY_SIDE = 256


def overlay_thumbnails(model: Predictor, files: Sequence[str], out: Path) -> dict[str, str]:
    """``out/explained/<hash>.png`` for each readable file: the overlay of what the model looked
    at; returns file -> its relative URL. A model without class maps gets none (an empty dict)."""
    if model.why_not_explainable() is not None:
        return {}
    folder = out / "explained"
    urls: dict[str, str] = {}
    for file in files:
        try:
            array = load_array(file, model.preprocessing, file)
            explained = model._explanations([(file, file, array)], False)[0]
            picture = open_image(file, file, draft_size=OVERLAY_SIDE)
        except ImageDecodeError:
            continue
        picture.thumbnail((OVERLAY_SIDE, OVERLAY_SIDE))
        drawn = overlay(picture, full_size_map(explained.cells, picture.size, model.preprocessing))
        folder.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(file.encode("utf-8", "surrogatepass")).hexdigest()[:20] + ".png"
        drawn.save(folder / name, "PNG")
        urls[file] = f"explained/{name}"
    return urls
