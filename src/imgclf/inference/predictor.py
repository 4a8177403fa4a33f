"""What every trained model answers: predict, predict_batch, evaluate.

The torch model (``imgclf.inference.model``) and the torch-free ONNX model
(``imgclf.inference.runtime``) differ only in how a batch of preprocessed images becomes
probabilities and unknown scores (``_outputs``); decoding in parallel threads, batching,
error reporting and evaluation live here once.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, overload

import numpy as np

from imgclf import rows
from imgclf.data.images import ImageData, find_image_files, load_images_from_directory
from imgclf.data.imaging import ImageSource, Preprocessing, load_array
from imgclf.data.inputs import ACCEPTED, array_image, image_items, is_many, labelled_items
from imgclf.data.parallel import batched, ordered_map
from imgclf.errors import DataError, ImageDecodeError, OptionError
from imgclf.inference.metrics import MulticlassMetrics, compute_metrics
from imgclf.inference.multilabel import MultilabelMetrics, compute_multilabel_metrics, label_matrix, labels_over
from imgclf.options import option_error

#: What ``predict`` takes: encoded bytes, a path, an open binary file, a PIL image, a uint8
#: image array (HxW, HxWx1, HxWx3 or HxWx4), or an ``ImageData``.
ImageInput = ImageSource | BinaryIO | ImageData | np.ndarray
#: Several images: a sequence of them or an NxHxWxC uint8 array; a DataFrame with a path column
#: or a Series is taken too (``imgclf.data.inputs``).
ManyImages = Sequence[ImageInput] | np.ndarray


def short_list(items: Sequence[str], most: int = 6) -> str:
    """A list for a repr: the first few items and how many there are."""
    if len(items) <= most:
        return repr(list(items))
    return "[" + ", ".join(repr(x) for x in items[:most]) + f", ... ({len(items)} in all)]"


def image_source(image: Any, name: str | None = None) -> tuple[ImageSource, str]:
    """What to decode for ``image`` and the name its errors are reported under.

    A path is named by itself, an ``ImageData`` by its name, a file object by its
    ``name`` attribute; bytes, PIL images and arrays by ``name`` if given. An array
    becomes the PIL image it is (:func:`imgclf.data.inputs.array_image`).
    """
    from PIL import Image

    if isinstance(image, np.ndarray):
        name = name or "<array>"
        return array_image(image, name), name
    if isinstance(image, ImageData):
        return image.source, name or image.name
    if isinstance(image, (str, Path)):
        if not str(image).strip():  # Path("") is the current folder: "cannot read file (Is a directory)"
            raise DataError(f"{name or 'image'}: an empty path; give an image file's path")
        return Path(image), name or str(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return image, name or "<bytes>"
    if isinstance(image, Image.Image):
        return image, name or getattr(image, "filename", "") or "<PIL image>"
    if hasattr(image, "read"):
        label = name or str(getattr(image, "name", "") or "<file object>")
        try:
            data = image.read()
        except (OSError, ValueError) as e:
            raise ImageDecodeError(f"{label}: cannot read file object ({e})") from None
        if not isinstance(data, (bytes, bytearray)):
            raise ImageDecodeError(f"{label}: file object gives {type(data).__name__}, not bytes; open it with 'rb'")
        return bytes(data), label
    if isinstance(image, Iterator):  # a generator: several images, which predict_batch takes
        raise DataError(f"cannot read an image from {type(image).__name__}; for several images call "
                        "predict_batch, or predict(list(...))")  # fmt: skip
    raise DataError(f"cannot read an image from {type(image).__name__}; give {ACCEPTED}")


#: What evaluating a single-label model on images labelled with sets of labels says.
SETS_FOR_A_SINGLE_LABEL_MODEL = ("these images have sets of labels (a manifest cell like 'a;b') and the model is "
                                 "single-label: evaluate a multi-label model on them, or give each image one label")


@dataclass
class Prediction:
    """The predicted label, its probability, and the probability of every label.

    ``scores`` maps every label to its probability, in the model's label order;
    :meth:`to_dict` gives the JSON form of the prediction row (:mod:`imgclf.rows`) the CLI
    and the HTTP API share: ``scores`` as a list of ``{"label", "probability"}``, most likely first.
    """

    label: str
    probability: float
    scores: dict[str, float] = field(repr=False)
    #: False when the image looks like nothing the model was trained on (:mod:`imgclf.inference.unknown`);
    #: None for a model without an unknown-input detector.
    known: bool | None = None
    #: How far its features lie from the training images' (higher: less like them); None without a detector.
    unknown_score: float | None = None
    #: A multi-label model's answer: every label whose probability reaches its threshold, with
    #: that probability, most likely first (possibly none). None for a single-label model.
    labels: list[tuple[str, float]] | None = None

    def top(self, k: int) -> list[tuple[str, float]]:
        """The ``k`` most likely labels with their probabilities, best first."""
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:  # -1 sliced off the last label
            raise OptionError(f"top_k must be a positive integer, got {k!r}")
        return sorted(self.scores.items(), key=lambda kv: -kv[1])[:k]

    def row(self, file: str | None = None, top_k: int | None = None) -> dict:
        """This prediction as a prediction row (:mod:`imgclf.rows`), all labels or the ``top_k``."""
        return rows.scored(file, self.label, self.probability, self.top(len(self.scores) if top_k is None else top_k),
                           self.known, self.unknown_score, self.labels)  # fmt: skip

    def to_dict(self, top_k: int | None = None, file: str | None = None) -> dict:
        """The row's JSON form (:func:`imgclf.rows.document`): ``file``, ``label``,
        ``probability``, ``scores`` (``[{"label", "probability"}, ...]``, best first, all labels
        or the ``top_k`` most likely) and ``error`` (null)."""
        return rows.document(self.row(file, top_k))

    def __repr__(self) -> str:
        if self.labels is not None:
            said = ", ".join(f"{lbl!r}: {p:.4f}" for lbl, p in self.labels)
            return f"Prediction(labels={{{said}}}, top={self.label!r})"
        others = ", ".join(f"{lbl!r}: {p:.4f}" for lbl, p in self.top(3)[1:])
        more = ", ..." if len(self.scores) > 3 else ""
        known = "" if self.known is None else f", known={self.known}"
        return f"Prediction(label={self.label!r}, probability={self.probability:.4f}{known}, next={{{others}{more}}})"


class Predictor:
    """Base of trained models. Subclasses set ``labels``, ``preprocessing``
    and implement ``_outputs``."""

    labels: list[str]
    preprocessing: Preprocessing
    info: dict
    batch_size: int = 32
    workers: int | None = None
    threads: int | None = None  # threads of the network's engine; None: its default
    job_size: int | None = None  # images the caller will score, if known: a small job skips compiling
    thresholds: list[float] | None = None  # a multi-label model's per-label thresholds (imgclf.inference.multilabel)

    @property
    def multilabel(self) -> bool:
        """Whether this model answers a set of labels (sigmoid per label) rather than one."""
        return self.thresholds is not None

    def engine_choice(self, images: int | None = None):
        """The :class:`imgclf.nets.engines.EngineChoice` running (or about to run) the network."""
        raise NotImplementedError

    @property
    def metrics_(self) -> dict | None:
        """Held-out metrics measured at training time, if the model file has them."""
        return self.info.get("metrics")

    @property
    def unknown_threshold(self) -> float | None:
        """Unknown scores above this are ``known: false``; None for a model without a detector."""
        return None

    def _probabilities(self, arrays: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) float32 preprocessed images -> (N, classes) probabilities."""
        return self._outputs(arrays)[0]

    def _outputs(self, arrays: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, 3, H, W) float32 preprocessed images -> (N, classes) probabilities and (N,)
        unknown scores (None for a model without an unknown-input detector)."""
        raise NotImplementedError

    def _explained(self, arrays: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """As :meth:`_outputs`, plus the (N, classes, h, w) class activation maps
        (:mod:`imgclf.inference.explain`); raises ``NotExplainableError`` where the model has none."""
        raise NotImplementedError

    def why_not_explainable(self) -> str | None:
        """None where this model gives class activation maps; else why not."""
        return "this model type gives no class activation maps"

    def explain(self, image: ImageInput, name: str | None = None, *, map_size: bool = True):
        """Predict one image (anything :meth:`predict` takes) and say where the evidence for the
        predicted label lies: an :class:`imgclf.inference.explain.Explanation`, whose ``map`` has
        the full upright size of the image (``map_size=False``: leave ``map`` out, the server's
        case, which needs only the cells and the crop)."""
        source, name = image_source(image, name)
        return self._explanations([(source, name, load_array(source, self.preprocessing, name))], map_size)[0]

    def iter_explanations(self, items: Iterable[tuple[ImageInput, str | None]]):
        """(name, explanation or error) for each (image, name), in order, streaming, as
        :meth:`iter_predictions`; each explanation's map has its image's full upright size."""

        def load(item):
            image, name = item
            try:
                source, name = image_source(image, name)
                return name, (source, load_array(source, self.preprocessing, name))
            except ImageDecodeError as e:
                return name or str(getattr(image, "name", "") or "<file object>"), e

        loaded = ordered_map(load, items, self.workers, prefetch=2 * self.batch_size)
        for chunk in batched(loaded, self.batch_size):
            good = [(i, name, value) for i, (name, value) in enumerate(chunk) if not isinstance(value, ImageDecodeError)]
            try:
                done = self._explanations([(v[0], name, v[1]) for _, name, v in good], True) if good else []
            except ImageDecodeError:  # reading a header again for the full size failed: one image at a time
                done = [self._explanation_or_error(v[0], name, v[1]) for _, name, v in good]
            by_index = {i: result for (i, _, _), result in zip(good, done)}
            for i, (name, value) in enumerate(chunk):
                yield name, by_index.get(i, value)

    def _explanation_or_error(self, source, name, array):
        try:
            return self._explanations([(source, name, array)], True)[0]
        except ImageDecodeError as e:
            return e

    def _explanations(self, loaded, map_size: bool) -> list:
        from imgclf.data.imaging import oriented_size
        from imgclf.inference.explain import Explanation, crop_box, full_size_map

        probs, scores, maps = self._explained(np.stack([array for _, _, array in loaded]))
        results = []
        for k, (source, name, _) in enumerate(loaded):
            prediction = self._prediction(probs[k], None if scores is None else scores[k])
            cells = np.ascontiguousarray(maps[k, self.labels.index(prediction.label)], np.float32)
            size = oriented_size(source, name)
            full = full_size_map(cells, size, self.preprocessing) if map_size else np.zeros((0, 0), np.float32)
            results.append(Explanation(prediction, cells, full, crop_box(size, self.preprocessing), size))
        return results

    def _prediction(self, probs: np.ndarray, score: float | None = None) -> Prediction:
        best = int(probs.argmax())
        known = None if score is None or self.unknown_threshold is None else bool(score <= self.unknown_threshold)
        answered = None if self.thresholds is None else labels_over(probs, self.thresholds, self.labels)
        return Prediction(self.labels[best], float(probs[best]), {lbl: float(p) for lbl, p in zip(self.labels, probs)},
                          known=known, unknown_score=None if score is None else float(score), labels=answered)  # fmt: skip

    def known_of(self, scores: np.ndarray | None) -> np.ndarray | None:
        """``known`` for each unknown score (None where the model has no detector)."""
        if scores is None or self.unknown_threshold is None:
            return None
        return np.asarray(scores) <= self.unknown_threshold

    def predict_arrays(self, arrays: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities and unknown scores (None without a detector) for already preprocessed images, in batches."""
        outputs = [self._outputs(arrays[i : i + self.batch_size]) for i in range(0, len(arrays), self.batch_size)]
        if not outputs:
            return np.zeros((0, len(self.labels)), np.float32), None
        probs = np.concatenate([p for p, _ in outputs])
        scores = None if any(s is None for _, s in outputs) else np.concatenate([s for _, s in outputs])
        return probs, scores

    def predict_proba_arrays(self, arrays: np.ndarray) -> np.ndarray:
        """Probabilities for already preprocessed images, in batches."""
        return self.predict_arrays(arrays)[0]

    @overload
    def predict(self, image: ImageInput, name: str | None = None) -> Prediction: ...

    @overload
    def predict(self, image: ManyImages, name: None = None) -> list[Prediction]: ...

    def predict(self, image, name=None):
        """Score one image: encoded bytes, a path, a binary file object, a PIL image, a uint8
        array (HxW, HxWx1, HxWx3 or HxWx4, channels last, RGB) or an ``ImageData`` (as
        :func:`imgclf.load_images_from_directory` returns them). Errors name the file (or ``name``).

        Given several images (a list or tuple, an NxHxWxC array, a DataFrame with a path
        column, a Series), returns a list of predictions, as :meth:`predict_batch`.
        """
        if is_many(image):
            if name is not None:
                raise DataError("name names one image; several images are named by their paths (or positions)")
            return self.predict_batch(image)
        source, name = image_source(image, name)
        probs, scores = self._outputs(load_array(source, self.preprocessing, name)[None])
        return self._prediction(probs[0], None if scores is None else scores[0])

    def predict_batch(self, images: ManyImages | str | Path) -> list[Prediction]:
        """Score many images: a list (or tuple, or Series) of anything :meth:`predict` takes, an
        NxHxWxC uint8 array, a DataFrame with a path column (``path``, ``filepath``, ``file``,
        ``filename``, ``image``...), or a folder's images, sorted. Raises
        :class:`ImageDecodeError`, naming the file, for the first bad one."""
        if isinstance(images, (str, Path)):
            images = find_image_files([images])
        results = []
        for _, outcome in self.iter_predictions(image_items(images, "predict_batch")):
            if isinstance(outcome, ImageDecodeError):
                raise outcome
            results.append(outcome)
        return results

    def _load(self, item: tuple[ImageInput, str | None]):
        image, name = item
        try:
            source, name = image_source(image, name)
            return name, load_array(source, self.preprocessing, name)
        except ImageDecodeError as e:
            return name or str(getattr(image, "name", "") or "<file object>"), e

    def iter_predictions(
        self, items: Iterable[tuple[ImageInput, str | None]]
    ) -> Iterator[tuple[str, Prediction | ImageDecodeError]]:
        """(name, prediction or error) for each (image, name), in order, streaming.

        Decoding runs in threads while the network works on the previous batch;
        a bad image yields its error and the others are still scored.
        """
        loaded = ordered_map(self._load, items, self.workers, prefetch=2 * self.batch_size)
        for chunk in batched(loaded, self.batch_size):
            good = [(i, arr) for i, (_, arr) in enumerate(chunk) if not isinstance(arr, ImageDecodeError)]
            probs, scores = self._outputs(np.stack([a for _, a in good])) if good else ([], None)
            scores = [None] * len(probs) if scores is None else scores
            by_index = {i: self._prediction(p, s) for (i, _), p, s in zip(good, probs, scores)}
            for i, (name, arr) in enumerate(chunk):
                yield name, by_index.get(i, arr)

    def evaluate(
        self, images: ManyImages | str | Path, labels: Sequence[str] | None = None, *, reject_unknown: bool = False
    ) -> MulticlassMetrics | MultilabelMetrics:
        """Metrics on labelled images: ``ImageData`` with labels, a folder with one subfolder per
        label, a DataFrame with path and label columns (``label``, ``class``...), or any images
        :meth:`predict_batch` takes with ``labels``, one per image (scikit-learn's ``score(X, y)``).
        Paths given alone are labelled by the name of their folder (fastai's ``parent_label``).
        Unreadable images are skipped with a warning, and a label with no image is warned about.
        ``reject_unknown``: also measure how many images the unknown-input detector rejects and
        the accuracy on the others (``metrics.unknown``); a model without a detector refuses it."""
        import warnings

        if isinstance(images, (str, Path)):
            if labels is not None:
                raise DataError("evaluate: a folder's labels are its subfolders' names; give labels with a list "
                                "of images, not with a folder")  # fmt: skip
            images = load_images_from_directory(images)
        items, from_folders = labelled_items(images, labels, "evaluate")
        if reject_unknown and self.multilabel:
            raise option_error("reject_unknown", "{reject_unknown}: a multi-label model's rows carry known, but its "
                                                 "evaluation does not reject images yet; drop {reject_unknown}")  # fmt: skip
        if self.multilabel:
            return self._evaluate_multilabel(items)
        if isinstance(images, (list, tuple)) and any(getattr(im, "labels", None) is not None for im in images):
            raise DataError(SETS_FOR_A_SINGLE_LABEL_MODEL)
        unknown = sorted({label for _, _, label in items if label not in self.labels})
        if unknown:
            said = ", ".join(repr(x) for x in unknown) if from_folders else ", ".join(unknown)
            hint = (" (a path given alone is labelled by its folder's name; give evaluate(paths, labels))"
                    if from_folders else "")  # fmt: skip
            raise DataError(f"evaluation images have labels the model does not know: {said}{hint}")
        if reject_unknown and self.unknown_threshold is None:
            raise DataError("reject_unknown: this model has no unknown-input detector (it was trained before imgclf "
                            "had one); train it again to get one")  # fmt: skip
        probs, targets, known = [], [], []
        for (_, _, label), (_, outcome) in zip(items, self.iter_predictions((im, n) for im, n, _ in items)):
            if isinstance(outcome, ImageDecodeError):
                warnings.warn(f"skipped {outcome}", stacklevel=2)
                continue
            probs.append([outcome.scores[lbl] for lbl in self.labels])
            targets.append(self.labels.index(label))
            known.append(outcome.known)
        if not probs:
            raise DataError("no readable images to evaluate on")
        present = set(targets)
        absent = [lbl for i, lbl in enumerate(self.labels) if i not in present]
        if absent:
            warnings.warn(f"no evaluation image of label(s) {', '.join(absent)}: their recall is not measured "
                          "and the accuracy leaves them out", stacklevel=2)  # fmt: skip
        metrics = compute_metrics(np.asarray(probs), targets, self.labels)
        if reject_unknown:
            kept = np.asarray(known, bool)
            right = np.asarray(probs).argmax(axis=1) == np.asarray(targets)
            metrics.unknown = {"rejected": float(1 - kept.mean()), "rejected_images": int((~kept).sum()),
                               "accepted_accuracy": float(right[kept].mean()) if kept.any() else None,
                               "threshold": self.unknown_threshold}  # fmt: skip
        return metrics

    def _evaluate_multilabel(self, items: list[tuple[Any, str | None, str]]) -> MultilabelMetrics:
        """A multi-label model's metrics: each item's label is its set of labels joined by ``;``
        (as ``ImageData.label`` holds it; a single-label image is a set of one)."""
        import warnings

        from imgclf.data.images import split_labels

        sets = [split_labels(label) for _, _, label in items]
        unknown = sorted({name for names in sets for name in names} - set(self.labels))
        if unknown:
            raise DataError(f"evaluation images have labels the model does not know: {', '.join(unknown)}")
        probs, kept = [], []
        for names, (_, outcome) in zip(sets, self.iter_predictions((im, n) for im, n, _ in items)):
            if isinstance(outcome, ImageDecodeError):
                warnings.warn(f"skipped {outcome}", stacklevel=3)
                continue
            probs.append([outcome.scores[lbl] for lbl in self.labels])
            kept.append(names)
        if not probs:
            raise DataError("no readable images to evaluate on")
        return compute_multilabel_metrics(np.asarray(probs), label_matrix(kept, self.labels), self.labels,
                                          self.thresholds)  # fmt: skip
