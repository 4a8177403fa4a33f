"""Explanations: class activation maps (CAM), computed in the network's own graph.

For a backbone that ends in global average pooling followed by a linear head, the
logit of class ``c`` is the spatial mean of ``W_c . F(y, x) + b_c``, where ``F`` is the
last feature map (Zhou et al., "Learning deep features for discriminative
localization", 2016). That map, ``W_c . F + b_c`` at the feature map's resolution,
is the class activation map: where the evidence for ``c`` lies, in the head's own units
(its spatial mean *is* the logit), with no gradients. So it is one more output of the
exported ONNX graph (``class_maps``, float32 ``(N, classes, h, w)``; for Lite0 at 224
pixels ``h = w = 7``), computed by whatever runs the graph: the torch model, the
torch-free runtime, the server. A model with test-time augmentation averages each map
with the flipped-back map of the mirror image, as it averages the probabilities.

The map explains the crop the network saw (resize the shorter side, centre crop,
:class:`imgclf.data.imaging.Preprocessing`); :func:`full_size_map` lays it back on the
whole image, upright per its EXIF orientation and at its full size, bilinearly, and
gives every pixel outside the crop the map's minimum: nothing there was evidence.

Numpy and Pillow only, except :func:`explained_module` (torch, used by export).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import numpy as np

from imgclf.data.imaging import Preprocessing
from imgclf.errors import ImgclfError, NotExplainableError, OptionError
from imgclf.inference.multilabel import torch_probabilities

MAPS_OUTPUT = "class_maps"
METHOD = "cam"


def why_not_explainable(backbone) -> str | None:
    """None where ``backbone`` (a timm network built with ``num_classes=0``) ends in a
    spatial feature map and global average pooling, so that CAM is exact; else why not."""
    if not (hasattr(backbone, "forward_features") and hasattr(backbone, "forward_head")):
        return "its network has no separate feature map and pooling (forward_features, forward_head)"
    pool = getattr(backbone, "global_pool", None)
    kind = getattr(pool, "pool_type", None)
    if kind != "avg":
        return f"its network pools its features with {kind or type(pool).__name__}, not a global average"
    return None


def explained_module(backbone, head, tta: bool, multilabel: bool = False):
    """A torch module: images -> (pooled features, probabilities, class maps): the same
    features and probabilities as ``head(backbone(x))`` (softmax, or a sigmoid per label for
    a multi-label model), plus ``head`` applied at every position of the last feature map
    (a 1x1 convolution with the head's weights)."""
    import torch

    class Explained(torch.nn.Module):
        def __init__(self, backbone, head):
            super().__init__()
            self.backbone, self.head = backbone, head

        def _one(self, x: torch.Tensor):
            fmap = self.backbone.forward_features(x)
            features = self.backbone.forward_head(fmap)
            weight = self.head.weight[:, :, None, None]
            logits = self.head(features)
            probs = torch_probabilities(logits, multilabel)
            return features, probs, torch.nn.functional.conv2d(fmap, weight, self.head.bias)

        def forward(self, x: torch.Tensor):
            features, probs, maps = self._one(x)
            if tta:
                _, flipped_probs, flipped_maps = self._one(torch.flip(x, dims=[3]))
                probs = (probs + flipped_probs) / 2
                maps = (maps + torch.flip(flipped_maps, dims=[3])) / 2
            return features, probs, maps

    return Explained(backbone, head).eval()


@dataclass
class Explanation:
    """What the model looked at for one image: its prediction, and the class activation map
    of the predicted label at the feature map's resolution (``cells``) and laid on the whole
    image (``map``: float32, the image's full upright height x width, higher = more evidence
    for ``label``; outside the crop the network saw, the map's minimum)."""

    prediction: object  # imgclf.inference.predictor.Prediction
    cells: np.ndarray = field(repr=False)  # (h, w) float32: the map as the network computed it
    map: np.ndarray = field(repr=False)  # (H, W) float32 at the image's full size
    crop: tuple[float, float, float, float]  # (left, top, right, bottom) of the crop, in image pixels
    size: tuple[int, int] = (0, 0)  # (width, height) of the whole upright image

    @property
    def label(self) -> str:
        return self.prediction.label


def crop_box(size: tuple[int, int], prep: Preprocessing) -> tuple[float, float, float, float]:
    """The square (or rectangle) the network saw, in the full image's pixels (left, top, right, bottom),
    as :func:`imgclf.data.imaging.resize_and_crop` cuts it from the resized image."""
    width, height = size
    resized = _resized_size(size, prep)
    sx, sy = width / resized[0], height / resized[1]
    left = int(round((resized[0] - prep.width) / 2.0))
    top = int(round((resized[1] - prep.height) / 2.0))
    return left * sx, top * sy, (left + prep.width) * sx, (top + prep.height) * sy


def _resized_size(size: tuple[int, int], prep: Preprocessing) -> tuple[int, int]:
    """The image's size after the resize, before the crop (a whole-frame model: the input itself)."""
    if getattr(prep, "frame", "crop") == "whole":
        return prep.width, prep.height
    width, height = size
    short = prep.resize_to
    if width <= height:
        return short, max(1, int(short * height / width))
    return max(1, int(short * width / height)), short


def _axis_weights(full: int, resized: int, offset: int, crop: int, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear weights (full x cells) taking ``cells`` map values to ``full`` pixel centres,
    and which of those pixels lie inside the crop."""
    centres = (np.arange(full, dtype=np.float64) + 0.5) * (resized / full) - offset  # in crop pixels
    inside = (centres >= 0) & (centres < crop)
    pos = np.clip(centres * (cells / crop) - 0.5, 0, cells - 1)
    low = np.floor(pos).astype(int)
    high = np.minimum(low + 1, cells - 1)
    frac = pos - low
    weights = np.zeros((full, cells), np.float32)
    rows = np.arange(full)
    np.add.at(weights, (rows, low), (1 - frac).astype(np.float32))
    np.add.at(weights, (rows, high), frac.astype(np.float32))
    return weights, inside


def full_size_map(cells: np.ndarray, size: tuple[int, int], prep: Preprocessing) -> np.ndarray:
    """The (h, w) map ``cells`` of the centre crop laid on an image of ``size`` (width, height):
    float32 (height, width), bilinear inside the crop, the map's minimum outside it."""
    width, height = size
    cells = np.asarray(cells, np.float32)
    resized = _resized_size(size, prep)
    left = int(round((resized[0] - prep.width) / 2.0))
    top = int(round((resized[1] - prep.height) / 2.0))
    wx, inside_x = _axis_weights(width, resized[0], left, prep.width, cells.shape[1])
    wy, inside_y = _axis_weights(height, resized[1], top, prep.height, cells.shape[0])
    out = (wy @ cells) @ wx.T
    low = np.float32(cells.min())
    out[~inside_y, :] = low
    out[:, ~inside_x] = low
    return out.astype(np.float32, copy=False)


#: Colour stops of the overlay's colour scale (dark blue: least evidence, red: most).
_STOPS = np.array([[0.0, 0, 0, 130], [0.3, 0, 90, 255], [0.55, 40, 220, 160], [0.8, 255, 220, 0], [1.0, 230, 20, 0]])


def colourise(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] as uint8 RGB on a blue-to-red scale (no matplotlib: the runtime is numpy and Pillow)."""
    values = np.clip(values, 0, 1)
    return np.stack([np.interp(values, _STOPS[:, 0], _STOPS[:, c]) for c in (1, 2, 3)], axis=-1).astype(np.uint8)


def normalised_map(values: np.ndarray) -> np.ndarray:
    """The map scaled to [0, 1] by its own minimum and maximum (all zero for a flat map)."""
    low, high = float(values.min()), float(values.max())
    return np.zeros_like(values, np.float32) if high <= low else ((values - low) / (high - low)).astype(np.float32)


def overlay(image, values: np.ndarray, strength: float = 0.55):
    """The RGB PIL ``image`` with the map ``values`` (same height and width) drawn over it:
    the more evidence, the more colour; the least evidence leaves the photo darkened a little."""
    from PIL import Image

    rgb = np.asarray(image.convert("RGB"), np.float32)
    if rgb.shape[:2] != values.shape:
        raise ValueError(f"the map is {values.shape[1]}x{values.shape[0]}, the image {rgb.shape[1]}x{rgb.shape[0]}")
    norm = normalised_map(values)
    alpha = (0.15 + strength * norm)[..., None]
    out = rgb * (1 - alpha) + colourise(norm).astype(np.float32) * alpha
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), "RGB")


def map_png(cells: np.ndarray, size: int = 0) -> bytes:
    """The map as a small greyscale PNG (0: its minimum, 255: its maximum), ``size`` pixels
    square when given (bilinear), else one pixel per cell: what the HTTP API returns."""
    import io

    from PIL import Image

    picture = Image.fromarray(np.round(normalised_map(np.asarray(cells, np.float32)) * 255).astype(np.uint8), "L")
    if size:
        picture = picture.resize((size, size), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return buffer.getvalue()


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def file_stem(name: str) -> str:
    """A file name for ``name``'s explanation files that no other name gets: its base name made
    safe (ASCII letters, digits, ``._-``; at most 60 characters) and 12 hex digits of the SHA-256
    of the whole name's bytes, so ``a/x.jpg`` and ``b/x.jpg`` differ and any bytes are fine."""
    from imgclf.names import name_bytes

    raw = name_bytes(name)
    base = raw.replace(b"\\", b"/").rsplit(b"/", 1)[-1].decode("utf-8", "replace")
    safe = _UNSAFE.sub("_", base).strip("._")[:60] or "image"
    return f"{safe}-{hashlib.sha256(raw).hexdigest()[:12]}"


def write_explanation(folder, name: str, source, explanation: Explanation) -> tuple[str, str]:
    """Write ``explanation`` of the image ``source`` (called ``name``) into ``folder``: the
    overlay on the whole upright image as ``<stem>.png`` and the map as ``<stem>.npy``
    (:func:`file_stem`), each atomically; returns their paths."""
    from pathlib import Path

    from imgclf.atomic import atomic_path
    from imgclf.data.imaging import open_image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = file_stem(name)
    picture = overlay(open_image(source, name), explanation.map)
    png, npy = folder / f"{stem}.png", folder / f"{stem}.npy"
    with atomic_path(png, "overlay") as tmp:
        picture.save(tmp, "PNG")
    with atomic_path(npy, "map") as tmp, open(tmp, "wb") as f:
        np.save(f, explanation.map, allow_pickle=False)
    return str(png), str(npy)


def _is_an_explain_index(index) -> bool:
    """Whether ``index`` is one an earlier ``--explain`` wrote (empty, or JSON lines with ``overlay``
    and ``map``): that one is this run's to replace, a user's file of the same name is not."""
    import json

    try:
        with open(index, encoding="utf-8") as f:
            first = f.readline()
        return not first.strip() or {"overlay", "map"} <= set(json.loads(first))
    except (OSError, ValueError, TypeError):
        return False


class ExplanationFolder:
    """``predict --explain DIR``: explains each image into ``DIR`` and lists it in
    ``DIR/index.jsonl`` (this run's images, one JSON object each: ``path``, ``path_bytes`` where the name is
    not UTF-8, ``label``, ``overlay``, ``map``), so every file can be traced to its image."""

    def __init__(self, folder, model, inputs=()):
        from pathlib import Path

        why = model.why_not_explainable()
        if why is not None:
            raise NotExplainableError(f"--explain: cannot explain this model's predictions: {why}")
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise OptionError(f"--explain: {folder} is a file; give a folder")
        where = self.folder.resolve()
        for given in map(Path, inputs):  # overlays among the images: the next predict of it scores them
            if given.is_dir() and (where == given.resolve() or given.resolve() in where.parents):
                raise OptionError(f"--explain {folder}: is inside the images folder {given}, where the next predict "
                                  "of it would score the overlays as images; give a folder outside it")  # fmt: skip
        index = self.folder / "index.jsonl"
        if index.is_file() and not _is_an_explain_index(index):
            raise OptionError(f"--explain {folder}: holds an index.jsonl that is not imgclf's list of "
                              "explanations; give another folder")  # fmt: skip
        self.folder.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.count = 0
        self._index = open(self.folder / "index.jsonl", "w", encoding="utf-8")  # this run's images

    def run(self, files):
        """(name, (prediction, extra row fields) or error) for each file, explanations written."""
        import json
        from pathlib import Path

        from imgclf.names import printable, raw_hex

        for name, outcome in self.model.iter_explanations((f, str(f)) for f in files):
            if isinstance(outcome, ImgclfError):
                yield name, outcome
                continue
            overlay_path, map_path = write_explanation(self.folder, name, Path(name), outcome)
            entry = {"path": printable(name), "path_bytes": raw_hex(name), "label": outcome.label,
                     "overlay": printable(overlay_path), "map": printable(map_path)}  # fmt: skip
            self._index.write(json.dumps(entry) + "\n")
            self.count += 1
            yield name, (outcome.prediction, {"explain": {"overlay": entry["overlay"], "map": entry["map"]}})

    def close(self) -> None:
        self._index.close()
