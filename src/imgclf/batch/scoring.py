"""The one way batch scoring loads a model and scores a batch of images.

The local engine, every Ray actor and every Spark executor load the model through
:func:`load_scoring_model`, so a choice about how the network runs (device,
threads, the inference engine and precision) reaches all of them at once.
Ray actors and Spark executors get the model file's bytes (:class:`ModelFile`),
so a cluster needs no shared storage for it.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgclf.batch.results import ResultBatch, result_metadata
from imgclf.batch.sources import is_uri, read_image_bytes
from imgclf.data.imaging import Preprocessing, load_array
from imgclf.data.parallel import ordered_map
from imgclf.errors import ImageDecodeError, ModelFileError
from imgclf.inference.loading import load_predictor
from imgclf.inference.predictor import Predictor


def load_scoring_model(
    path: str | Path,
    device: str = "cpu",
    threads: int | None = None,
    engine: str = "auto",
    precision: str = "auto",
) -> Predictor:
    """Load a model for batch scoring (``.imgclf`` or exported ``.onnx``), on the
    inference ``engine`` at ``precision`` that :func:`imgclf.nets.engines.choose_engine` picks.

    ``threads``: threads of the network's engine; a Ray actor passes its CPUs, since
    ONNX Runtime's default pool ignores Ray's limits and oversubscribes the machine.
    """
    predictor = load_predictor(path, device, engine, threads=threads, precision=precision)
    if threads and device == "cpu" and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)  # a torch model's eager path has its own pool
    return predictor


@dataclass(frozen=True)
class ModelFile:
    """A model file's name, bytes and SHA-256, to send to workers and record in results."""

    name: str
    data: bytes = field(repr=False)
    sha256: str

    @classmethod
    def read(cls, path: str | Path) -> ModelFile:
        from imgclf.data.uris import local_model_file

        path = local_model_file(path)
        if path.is_dir():
            raise ModelFileError(f"{path}: is a folder, not a model file (.imgclf or .onnx)")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ModelFileError(f"{path}: model file not found") from None
        except OSError as e:
            raise ModelFileError(f"{path}: cannot read model file ({e.strerror or e})") from None
        return cls(path.name, data, hashlib.sha256(data).hexdigest())

    def load(
        self, device: str = "cpu", threads: int | None = None, engine: str = "auto", precision: str = "auto"
    ) -> Predictor:
        """The model, loaded from a private temporary copy of the bytes."""
        with tempfile.TemporaryDirectory(prefix="imgclf-model-") as folder:
            copy = Path(folder) / self.name
            copy.write_bytes(self.data)
            return load_scoring_model(copy, device, threads, engine, precision)

    def metadata(self, labels: Sequence[str], top_k: int, ran: dict | None = None) -> dict:
        """The results' metadata: this model's name, SHA-256 and ``labels``, ``top_k``, and what ran."""
        return result_metadata(self.name, self.sha256, labels, top_k, ran)


def load_input(
    source: bytes | str | ImageDecodeError | None, name: str, preprocessing: Preprocessing
) -> np.ndarray | ImageDecodeError:
    """One image decoded into network input, or the error saying why it cannot be.

    ``source``: the image's bytes, or its path or URI (read here), or the error met
    reading it. Local paths go straight to the decoder, as ``imgclf predict`` does,
    so both see the same pixels.
    """
    if isinstance(source, ImageDecodeError):
        return source
    try:
        if source is None:
            raise ImageDecodeError(f"{name}: no image bytes")
        if isinstance(source, str) and is_uri(source):
            source = read_image_bytes(source)
        return load_array(source, preprocessing, name)
    except ImageDecodeError as e:
        return e


def score_sources(
    predictor: Predictor,
    paths: Sequence[str],
    sources: Sequence[bytes | str | ImageDecodeError | None],
    top_k: int,
    workers: int = 1,
) -> ResultBatch:
    """Decode ``sources`` in ``workers`` threads and score them: one row per input.

    Used where a batch arrives whole (a Ray actor, a Spark executor); the local
    engine streams instead (``imgclf.batch.local``).
    """
    prep = predictor.preprocessing
    outcomes = list(ordered_map(lambda item: load_input(item[0], item[1], prep), zip(sources, paths), workers))
    return score_loaded(predictor, paths, outcomes, top_k)


def score_loaded(
    predictor: Predictor, paths: Sequence[str], outcomes: Sequence[np.ndarray | ImageDecodeError], top_k: int
) -> ResultBatch:
    """Rows for images already decoded (errors stay error rows)."""
    good = [o for o in outcomes if not isinstance(o, ImageDecodeError)]
    if good:
        probabilities, scores = predictor.predict_arrays(np.stack(good))
    else:
        probabilities, scores = np.zeros((0, len(predictor.labels)), np.float32), None
    return ResultBatch.build(paths, outcomes, probabilities, predictor.labels, top_k, scores, predictor.known_of(scores),
                             thresholds=getattr(predictor, "thresholds", None))  # fmt: skip
