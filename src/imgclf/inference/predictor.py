"""What every trained model answers: predict, predict_batch, evaluate.

The torch model (``imgclf.inference.model``) and the torch-free ONNX model
(``imgclf.inference.runtime``) differ only in how a batch of preprocessed images becomes
probabilities (``_probabilities``); decoding in parallel threads, batching,
error reporting and evaluation live here once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from imgclf.data.images import ImageData
from imgclf.data.imaging import ImageSource, Preprocessing, load_array
from imgclf.data.parallel import batched, ordered_map
from imgclf.errors import DataError, ImageDecodeError
from imgclf.inference.metrics import MulticlassMetrics, compute_metrics


@dataclass
class Prediction:
    """The predicted label, its probability, and the probability of every label."""

    label: str
    probability: float
    scores: dict[str, float] = field(repr=False)

    def top(self, k: int) -> list[tuple[str, float]]:
        """The ``k`` most likely labels with their probabilities, best first."""
        return sorted(self.scores.items(), key=lambda kv: -kv[1])[:k]

    def to_dict(self, top_k: int | None = None) -> dict:
        scores = dict(self.top(top_k)) if top_k else dict(self.top(len(self.scores)))
        return {"label": self.label, "probability": self.probability, "scores": scores}


class Predictor:
    """Base of trained models. Subclasses set ``labels``, ``preprocessing``
    and implement ``_probabilities``."""

    labels: list[str]
    preprocessing: Preprocessing
    info: dict
    batch_size: int = 32
    workers: int | None = None
    threads: int | None = None  # threads of the network's engine; None: its default

    @property
    def metrics_(self) -> dict | None:
        """Held-out metrics measured at training time, if the model file has them."""
        return self.info.get("metrics")

    def _probabilities(self, arrays: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) float32 preprocessed images -> (N, classes) probabilities."""
        raise NotImplementedError

    def _prediction(self, probs: np.ndarray) -> Prediction:
        best = int(probs.argmax())
        return Prediction(self.labels[best], float(probs[best]),
                          {lbl: float(p) for lbl, p in zip(self.labels, probs)})  # fmt: skip

    def predict_proba_arrays(self, arrays: np.ndarray) -> np.ndarray:
        """Probabilities for already preprocessed images, in batches."""
        outputs = [self._probabilities(arrays[i : i + self.batch_size]) for i in range(0, len(arrays), self.batch_size)]
        return np.concatenate(outputs) if outputs else np.zeros((0, len(self.labels)), np.float32)

    def predict(self, image: ImageSource, name: str = "<image>") -> Prediction:
        """Score one image: bytes, a path, or a PIL image."""
        return self._prediction(self._probabilities(load_array(image, self.preprocessing, name)[None])[0])

    def predict_batch(self, images: Sequence[ImageSource]) -> list[Prediction]:
        """Score many images; raises :class:`ImageDecodeError` for the first bad one."""
        results = []
        for _, outcome in self.iter_predictions((im, f"image {i}") for i, im in enumerate(images)):
            if isinstance(outcome, ImageDecodeError):
                raise outcome
            results.append(outcome)
        return results

    def _load(self, item: tuple[ImageSource, str]):
        source, name = item
        try:
            return name, load_array(source, self.preprocessing, name)
        except ImageDecodeError as e:
            return name, e

    def iter_predictions(
        self, items: Iterable[tuple[ImageSource, str]]
    ) -> Iterator[tuple[str, Prediction | ImageDecodeError]]:
        """(name, prediction or error) for each (source, name), in order, streaming.

        Decoding runs in threads while the network works on the previous batch;
        a bad image yields its error and the others are still scored.
        """
        loaded = ordered_map(self._load, items, self.workers, prefetch=2 * self.batch_size)
        for chunk in batched(loaded, self.batch_size):
            good = [(i, arr) for i, (_, arr) in enumerate(chunk) if not isinstance(arr, ImageDecodeError)]
            probs = self._probabilities(np.stack([a for _, a in good])) if good else []
            by_index = {i: self._prediction(p) for (i, _), p in zip(good, probs)}
            for i, (name, arr) in enumerate(chunk):
                yield name, by_index.get(i, arr)

    def evaluate(self, images: Sequence[ImageData]) -> MulticlassMetrics:
        """Metrics on labelled images; unreadable images are skipped with a warning."""
        import warnings

        unknown = sorted({im.label for im in images if im.label is not None and im.label not in self.labels})
        if unknown:
            raise DataError(f"evaluation images have labels the model does not know: {', '.join(unknown)}")
        unlabeled = [im.name for im in images if im.label is None]
        if unlabeled:
            raise DataError(f"{unlabeled[0]}: evaluation image has no label")
        probs, targets = [], []
        for im, (_, outcome) in zip(images, self.iter_predictions((im.source, im.name) for im in images)):
            if isinstance(outcome, ImageDecodeError):
                warnings.warn(f"skipped {outcome}", stacklevel=2)
                continue
            probs.append([outcome.scores[lbl] for lbl in self.labels])
            targets.append(self.labels.index(im.label))
        if not probs:
            raise DataError("no readable images to evaluate on")
        return compute_metrics(np.asarray(probs), targets, self.labels)
