"""Experiment tracking: a training run logged to MLflow and to TensorBoard.

A :class:`Tracker` hears about a run three times: :meth:`~Tracker.start` with the
options, :meth:`~Tracker.epoch` with each :class:`EpochMetrics` the trainer reports
(head and fine-tune phases), and :meth:`~Tracker.finish` with the trained model (and,
from ``imgclf train``, the saved model file, the held-out metrics and the report).

- :class:`MlflowTracker` logs to the server named by ``MLFLOW_TRACKING_URI`` (else MLflow's
  local default, ``./mlflow.db`` and ``./mlruns``): the options as params, the epochs as metric history, the
  automatic decisions (engine, precision, fine-tune recipe) as tags, the held-out
  metrics, the report as artifacts and the model as a pyfunc model
  (:mod:`imgclf.inference.mlflow_model`), registered under a name when asked.
- :class:`TensorBoardTracker` writes event files: scalars per epoch, the confusion
  matrix and a few misclassified held-out images as images, and the options in the
  HParams plugin.

Tracking never costs the model: a tracker that fails (a server that is down, a full
disk) says so in one warning and is dropped, and training goes on. Under torchrun only
rank 0 tracks (the trainer opens trackers there alone).
"""

from __future__ import annotations

import json
import math
import tempfile
import urllib.request
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imgclf.errors import MissingDependencyError, OptionError
from imgclf.options import install_hint
from imgclf.training.history import EpochMetrics

#: MLflow's limits on a param's and a tag's value.
_PARAM_CHARS = 6000
_TAG_CHARS = 5000
#: Misclassified held-out images TensorBoard shows.
MISCLASSIFIED_IMAGES = 8


def require(module: str, extra: str, what: str) -> None:
    """Raise :class:`MissingDependencyError` (one line naming the extra) unless ``module`` imports."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(f"{what} needs {module}: {install_hint(extra)}")


def flat_params(params: dict, prefix: str = "") -> dict[str, str]:
    """Nested options as MLflow params: ``early_stopping.patience`` -> ``"10"``; None as ``"None"``."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_params(value, f"{name}."))
        else:
            flat[name] = str(value)[:_PARAM_CHARS]
    return flat


def decision_tags(info: dict) -> dict[str, str]:
    """The automatic decisions a model's ``info`` records, as tags ``imgclf.*``."""
    tags = {}
    training = info.get("training") or {}
    extraction = info.get("extraction") or {}
    decision = info.get("precision_decision") or {}
    metrics = info.get("metrics") or {}
    fine_tune = info.get("fine_tune")
    found = {
        "imgclf.arch": training.get("arch"),
        "imgclf.weights_source": info.get("weights_source"),
        "imgclf.engine": extraction.get("engine"),
        "imgclf.precision": decision.get("line"),
        "imgclf.precision.asked": decision.get("asked"),
        "imgclf.evaluated_at_precision": metrics.get("precision"),
        "imgclf.best_epoch": training.get("best_epoch"),
        "imgclf.resumed_from": training.get("resumed_from"),
        "imgclf.world_size": (info.get("distributed") or {}).get("world_size"),
        "imgclf.version": (info.get("versions") or {}).get("imgclf"),
    }
    if fine_tune:
        found["imgclf.fine_tune.kept"] = fine_tune.get("kept")
        found["imgclf.fine_tune.recipe"] = json.dumps(fine_tune.get("recipe"), sort_keys=True)
        found["imgclf.fine_tune.decisions"] = "\n".join(fine_tune.get("decisions") or [])
    for key, value in found.items():
        if value is not None and value != "":
            tags[key] = str(value)[:_TAG_CHARS]
    return tags


def scalar_metrics(metrics: dict | None, prefix: str = "test_") -> dict[str, float]:
    """The single numbers among held-out metrics (``micro_accuracy``, ``log_loss``...), prefixed."""
    found = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            found[f"{prefix}{key}"] = float(value)
    return found


def _epoch_values(m: EpochMetrics) -> dict[str, float]:
    values = {"train_loss": m.train_loss, "train_accuracy": m.train_accuracy, "learning_rate": m.learning_rate}
    if m.validation_loss is not None:
        values["validation_loss"] = m.validation_loss
    if m.validation_accuracy is not None:
        values["validation_accuracy"] = m.validation_accuracy
    phase = "fine_tune" if m.phase == "fine-tune" else "head"
    return {f"{phase}/{k}": float(v) for k, v in values.items() if math.isfinite(v)}


class Tracker:
    """What a training run tells a tracker; this one does nothing. Subclasses override."""

    name = "tracker"

    def check(self) -> None:
        """Raise before any work when this tracker cannot run here (its package is missing)."""

    def start(self, params: dict) -> None:
        """The run begins; ``params``: the trainer's options (``get_params()``)."""

    def epoch(self, m: EpochMetrics) -> None:
        """An epoch ended (head or fine-tune phase)."""

    def finish(self, model, *, model_file: Path | None = None, metrics: dict | None = None,
               report: Path | None = None, held_out=None) -> None:  # fmt: skip
        """The model is trained (and saved to ``model_file`` when given): log it and close the run.
        ``held_out``: the held-out ``ImageData`` (for TensorBoard's misclassified images)."""

    def fail(self, status: str = "FAILED") -> None:
        """The run stopped without a model (``FAILED``, or ``KILLED`` when interrupted)."""


class MlflowTracker(Tracker):
    """Logs a run to MLflow: ``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else MLflow's local default.

    ``experiment``: the experiment's name (default: ``MLFLOW_EXPERIMENT_NAME`` or MLflow's
    Default); ``run_name``; ``register``: also register the model under this name.
    """

    name = "mlflow"

    def __init__(self, experiment: str | None = None, run_name: str | None = None, register: str | None = None,
                 tracking_uri: str | None = None):  # fmt: skip
        self.experiment = experiment
        self.run_name = run_name
        self.register = register
        self.tracking_uri = tracking_uri
        self.run_id_: str | None = None
        self.model_uri_: str | None = None
        self.registered_version_: str | None = None

    def check(self) -> None:
        require("mlflow", "mlflow", "--mlflow")

    def _probe(self, uri: str) -> None:
        """A server that is down answers in seconds here, rather than after MLflow's retries."""
        if uri.startswith(("http://", "https://")):
            try:
                with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10):
                    pass
            except Exception as e:
                reason = getattr(e, "reason", None) or e
                raise ConnectionError(f"tracking server {uri} does not answer ({reason})") from None

    def start(self, params: dict) -> None:
        import mlflow

        if self.tracking_uri:
            mlflow.set_tracking_uri(self.tracking_uri)
        self._probe(mlflow.get_tracking_uri())
        if self.experiment:
            mlflow.set_experiment(self.experiment)
        run = mlflow.start_run(run_name=self.run_name)
        self.run_id_ = run.info.run_id
        mlflow.log_params(flat_params(params))
        mlflow.set_tag("imgclf.source", "imgclf train")

    def epoch(self, m: EpochMetrics) -> None:
        import mlflow

        mlflow.log_metrics(_epoch_values(m), step=m.epoch, run_id=self.run_id_)

    def finish(self, model, *, model_file=None, metrics=None, report=None, held_out=None) -> None:
        import mlflow

        from imgclf.inference.mlflow_model import ARTIFACT_PATH, log_model

        active = mlflow.active_run()
        if active is None or active.info.run_id != self.run_id_:
            mlflow.start_run(run_id=self.run_id_)
        mlflow.set_tags(decision_tags(model.info))
        mlflow.log_metrics(scalar_metrics(metrics if metrics is not None else model.info.get("metrics")))
        mlflow.log_dict(_jsonable({k: v for k, v in model.info.items() if k != "history"}), "imgclf/info.json")
        if metrics:
            mlflow.log_dict(_jsonable(metrics), "imgclf/metrics.json")
        if report is not None and Path(report).is_dir():
            mlflow.log_artifacts(str(report), "report")
        with tempfile.TemporaryDirectory(prefix="imgclf-mlflow-") as tmp:
            if model_file is None:
                model_file = _save_copy(model, Path(tmp) / "model.imgclf")
            logged = log_model(model_file, registered_model_name=self.register)
        self.model_uri_ = f"runs:/{self.run_id_}/{ARTIFACT_PATH}"
        self.registered_version_ = None if logged.registered_model_version is None else str(
            logged.registered_model_version)  # fmt: skip
        mlflow.end_run()

    def fail(self, status: str = "FAILED") -> None:
        import mlflow

        if self.run_id_ is not None and mlflow.active_run() is not None:
            mlflow.end_run(status)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _save_copy(model, path: Path) -> Path:
    """Save ``model`` to ``path`` for logging, keeping the run's checkpoint: only the
    user's own save of the model makes it safe to drop."""
    kept, model._checkpoint = model._checkpoint, None
    try:
        return model.save(path)
    finally:
        model._checkpoint = kept


class TensorBoardTracker(Tracker):
    """Writes TensorBoard event files to ``log_dir``: scalars per epoch (``head/...`` and
    ``fine_tune/...``), the held-out metrics, the confusion matrix and a few misclassified
    held-out images, and the options with the final metrics in the HParams plugin."""

    name = "tensorboard"

    def __init__(self, log_dir: str | Path):
        self.log_dir = log_dir
        self.writer_ = None
        self._params: dict = {}

    def check(self) -> None:
        require("tensorboard", "tensorboard", "--tensorboard")

    def start(self, params: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer_ = SummaryWriter(log_dir=str(self.log_dir))
        self._params = params

    def epoch(self, m: EpochMetrics) -> None:
        for tag, value in _epoch_values(m).items():
            self.writer_.add_scalar(tag, value, m.epoch)

    def finish(self, model, *, model_file=None, metrics=None, report=None, held_out=None) -> None:
        from torch.utils.tensorboard.summary import hparams

        metrics = metrics if metrics is not None else model.info.get("metrics")
        final = scalar_metrics(metrics, "test/")
        for tag, value in final.items():
            self.writer_.add_scalar(tag, value, 0)
        if metrics and metrics.get("confusion_matrix"):
            self.writer_.add_image("test/confusion_matrix", confusion_image(metrics["confusion_matrix"]), 0,
                                   dataformats="HWC")  # fmt: skip
        if held_out:
            for i, (title, picture) in enumerate(misclassified(model, held_out, MISCLASSIFIED_IMAGES)):
                self.writer_.add_image(f"misclassified/{i}", picture, 0, dataformats="HWC")
                self.writer_.add_text(f"misclassified/{i}", title, 0)
        history = model.info.get("history") or []
        hp = {k: _hparam(v) for k, v in flat_params(self._params).items()}
        # the HParams table shows the last value of each metric's own scalars: the held-out ones
        # and those of the last epoch (``head/...`` or ``fine_tune/...``)
        last = _epoch_values(EpochMetrics(**history[-1])) if history else {}
        for summary in hparams(hp, {**final, **last}):
            self.writer_.file_writer.add_summary(summary)
        self.writer_.close()

    def fail(self, status: str = "FAILED") -> None:
        if self.writer_ is not None:
            self.writer_.close()


def _hparam(text: str) -> Any:
    """A param back to a number or bool where it is one (HParams filters and sorts those)."""
    if text in ("True", "False"):
        return text == "True"
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() and "." not in text and "e" not in text.lower() else number


def confusion_image(matrix: Sequence[Sequence[int]], cell: int = 24):
    """The confusion matrix (rows: true labels, columns: predicted) as an RGB image, darker for more."""
    import numpy as np

    counts = np.asarray(matrix, dtype=np.float64)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    shade = (255 * (1 - shares)).astype(np.uint8)
    rgb = np.stack([shade, shade, np.full_like(shade, 255)], axis=-1)  # white to blue
    return np.kron(rgb, np.ones((cell, cell, 1), dtype=np.uint8))


def misclassified(model, images, most: int) -> list[tuple[str, Any]]:
    """Up to ``most`` held-out images the model gets wrong: (what it said, the picture as HWC uint8).
    A multi-label model is wrong on an image when the set it says is not the image's set."""
    import numpy as np
    from PIL import Image

    from imgclf.data.images import label_set

    wrong = []
    for image, (_, outcome) in zip(images, model.iter_predictions((im, None) for im in images)):
        if not hasattr(outcome, "label"):  # unreadable
            continue
        if outcome.labels is not None:  # a set of labels
            said, true = [name for name, _ in outcome.labels], label_set(image)
            if set(said) != set(true):
                wrong.append((image, f"true {', '.join(true) or 'none'}, said {', '.join(said) or 'none'}"))
        elif outcome.label != image.label:
            wrong.append((image, f"true {image.label}, predicted {outcome.label} ({outcome.probability:.2f})"))
        if len(wrong) == most:
            break
    pictures = []
    for image, said in wrong:
        try:
            with Image.open(image.source) as opened:
                picture = opened.convert("RGB")
                picture.thumbnail((224, 224))
                pictures.append((f"{image.name}: {said}", np.asarray(picture)))
        except (OSError, TypeError, ValueError):
            continue
    return pictures


def open_tracking(tracking: str | Tracker | Sequence[str | Tracker] | None) -> list[Tracker]:
    """The trainer's ``tracking`` as trackers: ``"mlflow"``, ``"tensorboard"`` (into ``./runs``),
    a :class:`Tracker`, or a list of them."""
    if tracking is None:
        return []
    if not isinstance(tracking, (str, Tracker, list, tuple)):
        raise OptionError(f"tracking must be 'mlflow', 'tensorboard', a Tracker or a list of them, got {tracking!r}",
                          "tracking")  # fmt: skip
    given = [tracking] if isinstance(tracking, (str, Tracker)) else list(tracking)
    trackers: list[Tracker] = []
    for item in given:
        if item == "mlflow":
            item = MlflowTracker()
        elif item == "tensorboard":
            item = TensorBoardTracker("runs")
        if not isinstance(item, Tracker):
            raise OptionError(f"tracking must be 'mlflow', 'tensorboard', a Tracker or a list of them, got {item!r}",
                              "tracking")  # fmt: skip
        trackers.append(item)
    return trackers


class Trackers(Tracker):
    """Several trackers as one. A tracker that fails warns once, in one line, and is dropped:
    training goes on and the model is saved whatever the tracking server does."""

    name = "trackers"

    def __init__(self, trackers: Sequence[Tracker]):
        self.trackers = list(trackers)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def check(self) -> None:
        for tracker in self.trackers:
            tracker.check()

    def _each(self, method: str, *args, **kwargs) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args, **kwargs)
            except Exception as e:
                self.trackers.remove(tracker)
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                warnings.warn(f"{tracker.name}: {first}; training goes on without it", stacklevel=3)
                try:
                    tracker.fail()
                except Exception:
                    pass

    def start(self, params: dict) -> None:
        self._each("start", params)

    def epoch(self, m: EpochMetrics) -> None:
        self._each("epoch", m)

    def finish(self, model, **kwargs) -> None:
        self._each("finish", model, **kwargs)

    def fail(self, status: str = "FAILED") -> None:
        self._each("fail", status)
