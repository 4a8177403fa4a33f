"""The frozen backbone pass ("bottleneck" features) and its on-disk cache.

ML.NET's method: run the pretrained network once over every image, keep the
pooled feature vector, and train only a small head on those vectors. The
vectors are cached in a workspace keyed by the image's content hash and by
everything that would change them (architecture, weights, preprocessing), so
a second run on the same images skips the network entirely, and a changed
image is re-extracted because its hash changes.
"""

from __future__ import annotations

import hashlib
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgclf.atomic import atomic_path
from imgclf.data.images import ImageData, content_hash
from imgclf.data.imaging import Preprocessing, load_array
from imgclf.data.parallel import batched, ordered_map
from imgclf.errors import ImageDecodeError, ImgclfError
from imgclf.nets.workspace import feature_file, feature_folder

FEATURE_FORMAT = "v1"


class FeatureCache:
    """Feature vectors on disk, one ``.npy`` per image content hash.

    ``writable=False`` only reads (a read-only workspace). A write that fails
    (disk full, permissions changed) stops further writes with one warning:
    a cache must never stop a training run.
    """

    def __init__(self, workspace: str | Path, key: str, *, writable: bool = True):
        self.folder = feature_folder(workspace, key)
        self.writable = writable

    def _path(self, digest: str) -> Path:
        return feature_file(self.folder, digest)

    def get(self, digest: str) -> np.ndarray | None:
        path = self._path(digest)
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None

    def put(self, digest: str, vector: np.ndarray) -> None:
        """Write atomically, so a reader never sees half a file."""
        if not self.writable:
            return
        try:
            with atomic_path(self._path(digest), "cached features") as tmp, open(tmp, "wb") as f:
                np.save(f, vector, allow_pickle=False)
        except ImgclfError as e:
            self.writable = False
            warnings.warn(f"feature cache: {e}; features are no longer cached in this run", stacklevel=2)


@dataclass
class ExtractionResult:
    """Features of the images that could be read, and why the others could not."""

    features: np.ndarray  # (n_ok, dim) float32, in input order
    kept: list[int]  # indices into the input of the rows of ``features``
    failures: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    extracted: int = 0  # how many went through the network (not cached)
    cached: int = 0


class FeatureExtractor:
    """Runs an engine (preprocessed batch -> pooled features) over images."""

    def __init__(
        self,
        engine,
        preprocessing: Preprocessing,
        cache_key: str,
        *,
        batch_size: int = 32,
        workers: int | None = None,
        workspace: str | Path | None = None,
        cache_writable: bool = True,
        progress: bool = True,
    ):
        self.engine = engine
        self.preprocessing = preprocessing
        self.batch_size = batch_size
        self.workers = workers
        self.progress = progress
        key = hashlib.sha256(f"{FEATURE_FORMAT}|{cache_key}|{preprocessing.key()}".encode()).hexdigest()[:16]
        self.cache = FeatureCache(workspace, key, writable=cache_writable) if workspace is not None else None

    def _prepare(self, image: ImageData):
        """Runs in a worker thread: hash, then a cache hit or decoded pixels."""
        try:
            data = image.read_bytes()
        except OSError as e:
            return None, None, ImageDecodeError(f"{image.name}: cannot read file ({e.strerror or e})")
        digest = content_hash(data)
        if self.cache is not None:
            hit = self.cache.get(digest)
            if hit is not None:
                return digest, hit, None
        try:
            return digest, load_array(data, self.preprocessing, image.name), None
        except ImageDecodeError as e:
            return digest, None, e

    def transform(self, images: Sequence[ImageData]) -> ExtractionResult:
        """Features for every readable image; unreadable ones are listed, not fatal."""
        from tqdm.auto import tqdm

        rows: list[np.ndarray | None] = [None] * len(images)
        failures: list[tuple[str, str]] = []
        extracted = cached = 0
        bar = tqdm(total=len(images), unit="img", desc="features", disable=None if self.progress else True,
                   file=sys.stderr, leave=False, dynamic_ncols=True)  # fmt: skip
        prepared = ordered_map(self._prepare, images, self.workers, prefetch=2 * self.batch_size)
        for chunk in batched(enumerate(prepared), self.batch_size):
            todo = []
            for i, (digest, value, error) in chunk:
                if error is not None:
                    failures.append((images[i].name, str(error)))
                elif value.ndim == 1:
                    rows[i] = value
                    cached += 1
                else:
                    todo.append((i, digest, value))
            if todo:
                vectors = self.engine(np.stack([v for _, _, v in todo]))
                for (i, digest, _), vec in zip(todo, vectors):
                    rows[i] = vec
                    if self.cache is not None:
                        self.cache.put(digest, vec)
                extracted += len(todo)
            bar.update(len(chunk))
        bar.close()
        kept = [i for i, r in enumerate(rows) if r is not None]
        dim = rows[kept[0]].shape[0] if kept else 0
        features = np.stack([rows[i] for i in kept]).astype(np.float32) if kept else np.zeros((0, dim), np.float32)
        return ExtractionResult(features, kept, failures, extracted, cached)
