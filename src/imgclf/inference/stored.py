"""The training images' pooled features, kept in the model file so that it can be trained on.

A head-only model is a frozen backbone plus a linear head fitted on the backbone's pooled
features. Keeping those features (float16, about 2.5 KB an image for efficientnet_lite0)
lets ``imgclf train NEW --from old.imgclf`` fit a new head on the old features and the new
images' together, as training from scratch on both would, without the old photos on disk.
The held-out images' features are kept apart, marked, so the next model is also measured on
them. A cap (``keep_features_mb``, 20 MB by default) bounds what the file grows by: over it,
each label keeps an equal share (all of a label smaller than its share), chosen by the seed.

Three tensors, beside the model's: ``stored.features`` (float16, images x features),
``stored.labels`` (int32, the label's position in the model's labels) and ``stored.held_out``
(uint8, 1 for a held-out image); the metadata field ``stored_features`` says how many.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf.errors import ModelFileError
from imgclf.options import KEEP_FEATURES_MB

PREFIX = "stored."
FEATURES, LABELS, HELD_OUT = f"{PREFIX}features", f"{PREFIX}labels", f"{PREFIX}held_out"
MB = 1024 * 1024


def bytes_per_image(num_features: int) -> int:
    """What one image costs in the file: its float16 features, label and held-out mark."""
    return 2 * num_features + 4 + 1


@dataclass
class StoredFeatures:
    """Pooled features of labelled images, rows aligned: ``labels`` index the model's labels."""

    features: np.ndarray  # (n, d) float16
    labels: np.ndarray  # (n,) int32
    held_out: np.ndarray  # (n,) bool
    of_images: int = 0  # how many the run had before the cap
    cap_mb: float = KEEP_FEATURES_MB

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def select(cls, train: tuple[np.ndarray, np.ndarray], held: tuple[np.ndarray, np.ndarray], cap_mb: float,
               seed: int) -> StoredFeatures | None:  # fmt: skip
        """The (features, label positions) of the training and the held-out images, under ``cap_mb``
        (None when nothing fits, or ``cap_mb`` is 0)."""
        features = np.concatenate([train[0], held[0]]).astype(np.float16)
        labels = np.concatenate([train[1], held[1]]).astype(np.int32)
        held_out = np.concatenate([np.zeros(len(train[1]), bool), np.ones(len(held[1]), bool)])
        room = int(cap_mb * MB) // bytes_per_image(features.shape[1]) if features.ndim == 2 else 0
        if room <= 0 or not len(labels):
            return None
        rows = np.arange(len(labels))
        if room < len(labels):
            rows = _equal_shares(labels, room, seed)
        return cls(features[rows], labels[rows], held_out[rows], of_images=len(labels), cap_mb=float(cap_mb))

    def part(self, held_out: bool) -> tuple[np.ndarray, np.ndarray]:
        """(float32 features, label positions) of the training (or held-out) rows."""
        rows = self.held_out == held_out
        return self.features[rows].astype(np.float32), self.labels[rows].astype(np.int64)

    def tensors(self) -> dict:
        import torch

        return {FEATURES: torch.from_numpy(np.ascontiguousarray(self.features)),
                LABELS: torch.from_numpy(np.ascontiguousarray(self.labels)),
                HELD_OUT: torch.from_numpy(self.held_out.astype(np.uint8))}  # fmt: skip

    def metadata(self) -> dict:
        """The ``stored_features`` field of the model's metadata."""
        return {"images": len(self), "held_out": int(self.held_out.sum()), "dtype": "float16",
                "of_images": int(self.of_images), "cap_mb": self.cap_mb,
                "mb": round(len(self) * bytes_per_image(self.features.shape[1]) / MB, 3)}  # fmt: skip


def _equal_shares(labels: np.ndarray, room: int, seed: int) -> np.ndarray:
    """``room`` row indices: each label an equal share, a label with fewer rows all of them and its
    unused share to the others; within a label, rows by a seeded shuffle."""
    rng = np.random.default_rng(seed)
    by_label = {int(lbl): rng.permutation(np.flatnonzero(labels == lbl)) for lbl in np.unique(labels)}
    share, left = {}, dict(by_label)
    while left:
        each = (room - sum(share.values())) // len(left)
        small = {lbl: rows for lbl, rows in left.items() if len(rows) <= each}
        if not small:
            for lbl in left:
                share[lbl] = each
            break
        for lbl, rows in small.items():
            share[lbl] = len(rows)
            del left[lbl]
    return np.sort(np.concatenate([by_label[lbl][: share[lbl]] for lbl in by_label]))


def read_stored(path: str | Path, config: dict) -> StoredFeatures | None:
    """The stored features of the model file ``path`` (its checked metadata: ``config``), checked
    against it; None when it keeps none. Raises :class:`ModelFileError` in one line."""
    from safetensors import safe_open

    said = config.get("stored_features")
    with safe_open(str(path), framework="numpy") as f:
        names = set(f.keys())
        if said is None or FEATURES not in names:
            return None
        if not {LABELS, HELD_OUT} <= names:
            raise ModelFileError(f"{path}: stored features are incomplete (no {LABELS} or {HELD_OUT})")
        features, labels, held = f.get_tensor(FEATURES), f.get_tensor(LABELS), f.get_tensor(HELD_OUT)
    n = said["images"]
    if (features.dtype != np.float16 or features.shape != (n, config["num_features"]) or labels.shape != (n,)
            or held.shape != (n,) or labels.dtype != np.int32):  # fmt: skip
        raise ModelFileError(f"{path}: stored features are {features.dtype} {list(features.shape)}, but the metadata "
                             f"names {n} images of {config['num_features']} float16 features")  # fmt: skip
    if n and (labels.min() < 0 or labels.max() >= len(config["labels"])):
        raise ModelFileError(f"{path}: stored features name a label outside the model's {len(config['labels'])}")
    if not np.isfinite(features).all():
        raise ModelFileError(f"{path}: stored features hold a value that is not a finite number")
    return StoredFeatures(features, labels, held.astype(bool), of_images=int(said.get("of_images", n)),
                          cap_mb=float(said.get("cap_mb", KEEP_FEATURES_MB)))  # fmt: skip
