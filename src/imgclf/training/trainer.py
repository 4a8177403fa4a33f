"""Training: ML.NET's ImageClassificationTrainer, done well.

The pretrained backbone stays frozen. Its pooled features are computed once
per image (and cached, ``imgclf.nets.features``), then a softmax head is trained on
them with mini-batch SGD, a learning-rate schedule and optional early stopping
that keeps the best epoch's weights.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imgclf.data.images import ImageData, check_labels, is_multilabel
from imgclf.data.inputs import encoded_image_data, is_item_array, is_table, labelled_items
from imgclf.data.layouts import load_dataset
from imgclf.data.splits import train_test_split
from imgclf.errors import DataError, OptionError, TrainingInterrupted
from imgclf.inference.model import ImageClassifier, library_versions
from imgclf.nets.archs import DEFAULT_ARCH, get_architecture, preprocessing_for
from imgclf.nets.features import ExtractionResult, FeatureExtractor
from imgclf.nets.pretrained import PretrainedNetwork
from imgclf.nets.workspace import default_workspace
from imgclf.options import (
    DEFAULT_QUALITY,
    DEFAULT_UNKNOWN_RATE,
    KEEP_FEATURES_MB,
    install_hint,
    option_error,
    parse_duration,
    validate,
)
from imgclf.options import LR_SCHEDULES as LR_SCHEDULES  # the names live in imgclf.options
from imgclf.training import distributed
from imgclf.training.budget import TimeBudget
from imgclf.training.checkpoint import Checkpoint, run_key
from imgclf.training.finetune import FineTuneOptions, carve_validation
from imgclf.training.history import BestEpoch, EarlyStopping, EpochMetrics
from imgclf.training.optim import HeadSGD
from imgclf.training.optim import learning_rate_at as learning_rate_at  # it lived here first
from imgclf.training.presets import QualityPlan, check_quality, plan_quality
from imgclf.training.tracking import Tracker, Trackers, open_tracking


def check_training_precision(precision: str, engine: str = "auto") -> None:
    """``precision`` at training: auto (certify bf16 where the CPU has it and the images are
    enough), fp32 (nothing more), bf16 (certify it: needs native bf16 and OpenVINO), int8
    (calibrate the int8 graph: needs NNCF). An ``engine`` named with a precision it does not
    run is refused as ``predict`` refuses it. Raises before any work; the names themselves are
    checked with the other options (:meth:`ImageClassificationTrainer.validate`)."""
    from imgclf.errors import MissingDependencyError
    from imgclf.nets.cpu import cpu_capabilities
    from imgclf.nets.engines import check_engine_runs, installed

    check_engine_runs(engine, precision)
    if precision == "bf16":
        caps = cpu_capabilities()
        if not caps.bf16:
            raise option_error("precision", f"{{precision}} bf16: this CPU has no native bf16 ({caps.source}), so "
                                            "it cannot be measured here; use auto or fp32")  # fmt: skip
        if not installed("openvino"):
            raise MissingDependencyError(f"precision bf16 runs on OpenVINO: {install_hint('openvino')}")
    if precision == "int8":
        from imgclf.inference.precision import int8_calibration_available

        if not int8_calibration_available():
            raise MissingDependencyError(f"precision int8 is calibrated by NNCF: {install_hint('openvino')}")


#: Why training takes no decoded pictures, and what to give instead.
ENCODED_ONLY = ("trains from encoded images, files or bytes (its feature cache is keyed by their content): give "
                "paths, a folder, a DataFrame with path and label columns, or ImageData; save arrays and PIL images "
                "as PNG files first, or pass image_from_bytes(png_bytes, label)")  # fmt: skip


def _as_images(images, labels=None, caller: str = "fit") -> list[ImageData]:
    """The labelled images to learn from: ``ImageData``, a folder with one subfolder per label,
    a DataFrame with path and label columns, or paths (or encoded bytes) with ``labels``, one
    per image, as scikit-learn's ``fit(X, y)``; paths alone are labelled by their folder's name."""
    if isinstance(images, (str, Path)):
        if labels is not None:
            raise DataError(f"{caller}: a folder's labels are its subfolders' names; give labels with a list of "
                            "images, not with a folder")  # fmt: skip
        return load_dataset(images).images  # a folder of label subfolders, a train/val/test tree or a manifest
    if (isinstance(images, np.ndarray) and not is_item_array(images)) or (
        isinstance(images, (list, tuple)) and any(isinstance(im, (np.ndarray, Image.Image)) for im in images)
    ):
        raise DataError(f"{caller} {ENCODED_ONLY}")
    if labels is None and isinstance(images, (list, tuple)) and all(isinstance(im, ImageData) for im in images):
        return list(images)
    return encoded_image_data(labelled_items(images, labels, caller)[0], f"{caller} {ENCODED_ONLY}")


def _labels_or_validation(labels, validation_set):
    """``fit(images, validation_set)`` as written before labels came second: a folder, a DataFrame
    or ``ImageData`` in that place are a validation set (labels are a list of text or numbers)."""
    if labels is None or validation_set is not None:
        return labels, validation_set
    if (isinstance(labels, (str, Path)) or is_table(labels) or
            (isinstance(labels, (list, tuple)) and labels and all(isinstance(im, ImageData) for im in labels))):  # fmt: skip
        return None, labels
    if isinstance(labels, (list, tuple)) and labels and all(isinstance(x, (str, Path)) and Path(x).is_file()
                                                            for x in labels):  # fmt: skip
        raise DataError(f"labels: every label is an image file (labels[0] = {str(labels[0])!r}); to give a "
                        "validation set, pass it as validation_set=...")  # fmt: skip
    return labels, None


def _none_readable(part: str, given: list[ImageData], skipped: list[tuple[str, str]], leave_out: str = "") -> str:
    """The line refusing a given ``part`` (the test set, a label) none of whose images can be
    read, with the first one's reason: a manifest's paths resolved from the wrong folder show here."""
    names = {im.name for im in given}
    first = next((reason if reason.startswith(name) else f"{name}: {reason}" for name, reason in skipped
                  if name in names), "")  # fmt: skip
    example = f" (e.g. {first})" if first else ""
    return (f"{part}: none of its {len(given)} image(s) is readable{example}; fix or replace them, "
            f"or {leave_out or f'leave the {part} out'}")  # fmt: skip


def _split_readable(images: list[ImageData], fraction: float, seed: int, part: str):
    """A stratified split of readable images; warns about labels the second part misses."""
    first, second = train_test_split(images, fraction, seed)
    missing = sorted({im.label for im in images} - {im.label for im in second})
    if missing:
        warnings.warn(f"label(s) {', '.join(map(str, missing))} have too few readable images to keep one in the "
                      f"{part} set; their accuracy there is not measured", stacklevel=4)  # fmt: skip
    return first, second


class ImageClassificationTrainer:
    """Retrains a pretrained ImageNet network on your labelled images.

    Options are stored as given; they are checked when :meth:`fit` runs.
    ``fit`` returns an :class:`ImageClassifier` that answers ``predict``,
    ``predict_batch``, ``evaluate`` and ``save``. ``tracking`` (``"mlflow"``,
    ``"tensorboard"``, or trackers of :mod:`imgclf.training.tracking`) logs the run:
    ``fit`` finishes it with the model, ``fit_and_hold_out`` leaves it to
    ``tracker_.finish`` (for the held-out metrics).

    ``quality`` (``"fast"``, ``"balanced"``, the default, or ``"best"``) says how much training
    to do and ``time_limit`` (seconds, or ``"10m"``) how long it may take
    (:mod:`imgclf.training.presets`): ``fast`` trains the head alone; ``balanced`` also fine-tunes
    photos unlike ImageNet, within 10 minutes unless told; ``best`` fine-tunes the whole backbone
    at full resolution. ``fine_tune=True`` fine-tunes whatever ``balanced`` decides.

    ``from_model`` (a model file) trains on from it: the images given add to what it
    learned, new labels after its own, from the training features it keeps
    (:mod:`imgclf.training.train_on`). ``keep_features_mb`` bounds the features this model
    keeps for that (0: none).

    Images with sets of labels (``ImageData.labels``: a manifest cell ``"a;b"`` or a list) train
    a multi-label model (:mod:`imgclf.training.multilabel`); ``frame`` picks its preprocessing
    (``"whole"``, its default, or ``"crop"``) and applies to multi-label training alone.
    """

    def __init__(
        self,
        arch: str = DEFAULT_ARCH,
        *,
        epochs: int = 50,
        batch_size: int = 10,
        learning_rate: float = 0.01,
        lr_schedule: str = "exponential",
        decay_rate: float = 0.94,
        decay_epochs: int = 2,
        end_learning_rate: float = 1e-4,
        power: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        early_stopping: EarlyStopping | None = None,
        validation_fraction: float | None = None,
        class_weight: str | None = None,
        quality: str = DEFAULT_QUALITY,
        time_limit: str | float | None = None,
        fine_tune: bool = False,
        fine_tune_options: FineTuneOptions | None = None,
        tta: bool = False,
        unknown_rate: float = DEFAULT_UNKNOWN_RATE,
        resume: bool = False,
        metrics_callback: Callable[[EpochMetrics], None] | None = None,
        seed: int = 1,
        weights: str | Path | None = None,
        device: str = "auto",
        engine: str = "auto",
        precision: str = "auto",
        workspace: str | Path | None = None,
        use_cache: bool = True,
        extraction_batch_size: int = 32,
        workers: int | None = None,
        progress: bool = True,
        max_memory_gb: float | None = None,
        tracking: str | Tracker | Sequence[str | Tracker] | None = None,
        from_model: str | Path | None = None,
        keep_features_mb: float = KEEP_FEATURES_MB,
        frame: str | None = None,
    ):
        self.arch = arch
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.lr_schedule = lr_schedule
        self.decay_rate = decay_rate
        self.decay_epochs = decay_epochs
        self.end_learning_rate = end_learning_rate
        self.power = power
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.class_weight = class_weight
        self.quality = quality
        self.time_limit = time_limit
        self.fine_tune = fine_tune
        self.fine_tune_options = fine_tune_options
        self.tta = tta
        self.unknown_rate = unknown_rate
        self.resume = resume
        self.metrics_callback = metrics_callback
        self.seed = seed
        self.weights = weights
        self.device = device
        self.engine = engine
        self.precision = precision
        self.workspace = workspace
        self.use_cache = use_cache
        self.extraction_batch_size = extraction_batch_size
        self.workers = workers
        self.progress = progress
        self.max_memory_gb = max_memory_gb
        self.tracking = tracking
        self.from_model = from_model
        self.keep_features_mb = keep_features_mb
        self.frame = frame  # multi-label only: "whole" (the default there) or "crop" (imgclf.training.multilabel)
        self.tracker_: Trackers | None = None

    #: The parameters checked against ``imgclf train``'s options (imgclf.options), whose
    #: constraints and defaults they share.
    _CHECKED = ("epochs", "batch_size", "learning_rate", "lr_schedule", "decay_rate", "decay_epochs", "momentum",
                "weight_decay", "validation_fraction", "class_weight", "seed", "device", "engine", "precision",
                "max_memory_gb", "extraction_batch_size", "keep_features_mb", "unknown_rate", "frame", "quality",
                "time_limit")  # fmt: skip

    def __repr__(self) -> str:
        """As scikit-learn writes an estimator: the options that differ from their defaults."""
        import inspect

        changed = [f"{name}={getattr(self, name, p.default)!r}"
                   for name, p in inspect.signature(type(self).__init__).parameters.items()
                   if name != "self" and p.default is not inspect.Parameter.empty
                   and getattr(self, name, p.default) != p.default]  # fmt: skip
        return f"{type(self).__name__}({', '.join(changed)})"

    def _check_options(self) -> None:
        validate("train", {name: getattr(self, name) for name in self._CHECKED})
        for name, kind in (("early_stopping", EarlyStopping), ("fine_tune_options", FineTuneOptions)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise OptionError(f"{name} must be an imgclf {kind.__name__} or None, got {value!r}", name)
        if self.metrics_callback is not None and not callable(self.metrics_callback):
            raise OptionError(f"metrics_callback must be a function of the epoch's metrics, got {self.metrics_callback!r}",
                              "metrics_callback")  # fmt: skip
        if self.early_stopping is not None:
            self.early_stopping.validate()  # again: its fields may have been changed since
        if self.fine_tune_options is not None:
            self.fine_tune_options.validate()
        check_quality(self.quality, self.fine_tune, self.from_model)
        check_training_precision(self.precision, self.engine)
        Trackers(open_tracking(self.tracking)).check()

    def validate(self) -> None:
        """Check every option now, before any work (``fit`` checks them again): a caller that
        loads or prints things first, as the CLI does, wants a bad option to cost nothing."""
        from imgclf.nets.device import resolve_device

        self._check_options()
        arch = get_architecture(self.arch)
        resolve_device(self.device)
        if self.from_model is not None:  # a model that cannot be trained on from costs a second, not a run
            from imgclf.training.train_on import open_old_model

            open_old_model(self.from_model, arch, preprocessing_for(arch), self.fine_tune)

    def fit(
        self,
        images: Sequence[ImageData] | Sequence[str | Path] | str | Path | Any,
        labels: Sequence[str] | None = None,
        validation_set: Sequence[ImageData] | str | Path | Any | None = None,
    ) -> ImageClassifier:
        """Train on labelled ``images``; returns the classifier.

        ``images``: ``ImageData`` with labels, a folder with one subfolder per label, a
        DataFrame with a path column (``path``, ``filepath``, ``file``, ``filename``,
        ``image``...) and a label column (``label``, ``class``...), or paths (or encoded
        bytes) with ``labels``, one per image, as scikit-learn's ``fit(X, y)``; paths given
        alone are labelled by the name of their folder (fastai's ``parent_label``). Decoded
        pictures (arrays, PIL images) are refused: training reads files or bytes, whose
        content keys the feature cache. ``validation_set`` takes a folder, ``ImageData``, a
        DataFrame or paths labelled by their folders; given second (as older code does), a
        folder, a DataFrame or an ``ImageData`` list is taken as the validation set.

        Unreadable images are skipped with a warning (listed in
        ``model.info["skipped"]``); a label left without any usable image is
        an error. ``validation_set`` (or ``validation_fraction``, split off after
        unreadable images are dropped) drives early stopping and the per-epoch
        validation metrics. The run's checkpoint stays in the workspace until the
        model is saved, so a run whose model could not be written can be finished
        with ``resume=True``.
        """
        labels, validation_set = _labels_or_validation(labels, validation_set)
        model = self._tracked_fit(images, validation_set, hold_out=None, labels=labels)[0]
        if self.tracker_:
            self.tracker_.finish(model)
        return model

    def fit_and_hold_out(
        self,
        images: Sequence[ImageData] | Sequence[str | Path] | str | Path | Any,
        test_fraction: float = 0.2,
        validation_set: Sequence[ImageData] | str | Path | Any | None = None,
        *,
        labels: Sequence[str] | None = None,
        test_set: Sequence[ImageData] | str | Path | Any | None = None,
    ) -> tuple[ImageClassifier, list[ImageData]]:
        """Train on all but a held-out share of ``images``; returns the model and the held-out images.

        What ``imgclf train`` does. Unreadable images are dropped *before* the
        split (stratified, seeded by ``seed``), so every label with two readable
        images keeps one in each part; a label with fewer gets a warning, since
        evaluating on the held-out images cannot measure it. Each image goes
        through the network once. ``images`` and ``labels``: as :meth:`fit`.

        ``test_set`` (or the ``test/`` part of a train/val/test folder or manifest given as
        ``images``) is held out as given instead of a share of ``images``: its readable images
        are those returned, and ``test_fraction`` is not used.
        """
        validate("train", {"test_fraction": test_fraction})
        return self._tracked_fit(images, validation_set, hold_out=test_fraction, labels=labels, test_set=test_set)

    def _tracked_fit(self, images, validation_set, hold_out: float | None, labels=None, test_set=None):
        """``_fit`` with the ``tracking`` trackers told (rank 0 alone): the run starts now and stays
        open for ``tracker_.finish``; a run that stops without a model is closed as failed."""
        self.tracker_ = None
        if self.tracking is not None and distributed.is_main_process():
            self._check_options()
            self.tracker_ = Trackers(open_tracking(self.tracking))
            self.tracker_.start(self.get_params())
        try:
            return self._fit(images, validation_set, hold_out, labels=labels, test_set=test_set)
        except BaseException as e:
            if self.tracker_:
                self.tracker_.fail("KILLED" if isinstance(e, (KeyboardInterrupt, TrainingInterrupted)) else "FAILED")
            raise

    def _report_epoch(self, m: EpochMetrics) -> None:
        if self.metrics_callback is not None:
            self.metrics_callback(m)
        if self.tracker_:
            self.tracker_.epoch(m)

    def _fit(
        self, images, validation_set, hold_out: float | None, labels=None, test_set=None
    ) -> tuple[ImageClassifier, list[ImageData]]:
        from imgclf.nets.device import resolve_device

        started = time.monotonic()  # the time limit counts from here
        if isinstance(images, (str, Path)) and labels is None:  # its own parts, when it has them
            dataset = load_dataset(images)
            images = dataset.train
            validation_set = dataset.validation if validation_set is None else validation_set
            test_set = dataset.test if test_set is None and hold_out is not None else test_set
        images = _as_images(images, labels)
        validation_set = None if validation_set is None else _as_images(validation_set, caller="validation_set")
        test_set = None if test_set is None else _as_images(test_set, caller="test_set")
        if is_multilabel(images + (validation_set or []) + (test_set or [])):
            from imgclf.training.multilabel import fit_multilabel

            return fit_multilabel(self, images, validation_set, test_set, hold_out)
        if self.frame is not None:
            raise option_error("frame", "{frame}: applies to multi-label training; these images have one label each")
        self._check_options()
        old = None
        if self.from_model is not None:
            from imgclf.training.train_on import open_old_model, union_labels

            arch = get_architecture(self.arch)
            old = open_old_model(self.from_model, arch, preprocessing_for(arch), self.fine_tune)
            labels, new_labels = union_labels(old, images)
        else:
            labels = new_labels = check_labels(images)
        for part, given in (("validation", validation_set), ("test", test_set)):
            unknown = sorted({im.label for im in given or []} - set(labels))
            if unknown:
                raise DataError(f"{part} set has labels not in the training set: {', '.join(map(str, unknown))}")

        device = distributed.local_device(resolve_device(self.device))  # under torchrun: LOCAL_RANK's GPU
        distributed.setup(device)
        arch = get_architecture(self.arch)
        preprocessing = preprocessing_for(arch)
        network = PretrainedNetwork(arch, self.weights, device, self.engine, preprocessing.shape)
        engine = network.feature_engine()  # built on the first image not in the cache
        workspace, writable = self._workspace()
        extractor = FeatureExtractor(
            engine, preprocessing, network.cache_key,
            batch_size=self.extraction_batch_size, workers=self.workers,
            workspace=workspace if self.use_cache else None, cache_writable=writable,
            progress=self.progress and distributed.is_main_process(),
        )  # fmt: skip
        if extractor.cache is not None:
            network.keep_tensors_in(extractor.cache.folder, writable)

        # Every image through the network (or the cache) first: only then is it known which
        # are readable, and the held-out and validation splits are made from those alone.
        everything = images + (test_set or [])
        pool = distributed.extract_sharded(extractor, everything)  # under torchrun each rank runs a share
        skipped = list(pool.failures)
        readable = [everything[i] for i in pool.kept]
        row_of = {id(im): r for r, im in enumerate(readable)}
        held_out: list[ImageData] = []
        if test_set is not None:  # held out as given
            in_test = {id(im) for im in test_set}
            held_out = [im for im in readable if id(im) in in_test]
            readable = [im for im in readable if id(im) not in in_test]
            if test_set and not held_out:
                raise DataError(_none_readable("test set", test_set, skipped, "leave the test part out"))
        empty = [lbl for lbl in new_labels if not any(im.label == lbl for im in readable)]
        if empty:
            given = [im for im in everything if im.label == empty[0]]
            raise DataError(_none_readable(f"label '{empty[0]}'", given, skipped,
                                           "remove the label (its folder, or its rows)"))  # fmt: skip
        if hold_out and test_set is None:
            readable, held_out = _split_readable(readable, hold_out, self.seed, "held-out")

        def from_pool(part: list[ImageData]) -> ExtractionResult:
            return ExtractionResult(pool.features[[row_of[id(im)] for im in part]], list(range(len(part))))

        backbone = network.for_model()
        plan = self._plan_quality(arch, preprocessing, backbone, from_pool(readable).features, readable, old)
        fine_tune, options = plan.fine_tune, plan.options
        val = None
        if validation_set is None and self.validation_fraction:
            readable, validation_set = _split_readable(readable, self.validation_fraction, self.seed, "validation")
            val = from_pool(validation_set)
        validation_note, carved = None, False  # fine-tuning holds out its own validation photos if none are given
        uncarved = readable
        if fine_tune and validation_set is None:
            readable, validation_set, validation_note = carve_validation(readable, options, self.seed)
            carved = validation_set is not None
            val = from_pool(validation_set) if carved else None
        images = readable
        train = from_pool(images)
        x_train, y_train = self._xy(train, images, labels)
        x_val = y_val = None
        if val is None and validation_set is not None and len(validation_set):
            val = distributed.extract_sharded(extractor, validation_set)
            skipped += val.failures
            if not len(val.kept):
                raise DataError(_none_readable("validation set", validation_set, val.failures, "leave the validation part out"))
        if val is not None and len(val.kept):
            x_val, y_val = self._xy(val, validation_set, labels)
        for name, reason in skipped:
            warnings.warn(f"skipped {reason}" if reason.startswith(name) else f"skipped {name}: {reason}", stacklevel=3)
        x_new, y_new = x_train, y_train  # the images given: what a precision is certified on
        if old is not None:  # the old model's training features join the new ones
            from imgclf.training.train_on import check_same_backbone

            check_same_backbone(old, backbone, network.source)
            known = {row.tobytes() for row in old.stored.features.astype(np.float16)}
            again = sum(row.tobytes() in known for row in pool.features.astype(np.float16))
            if again:  # the same photos again: counted twice, and a held-out one may be trained on
                warnings.warn(f"--from {self.from_model}: {again} of the new images are already in it (their features "
                              "match ones it keeps), so they count twice and the held-out measure may include "
                              "photos it trained on; give only photos it has not seen", stacklevel=3)  # fmt: skip
            x_old, y_old = old.stored.part(held_out=False)
            x_train, y_train = np.concatenate([x_train, x_old]), np.concatenate([y_train, y_old])

        class_weights = self._class_weights(y_train, len(labels))
        names = [im.name for im in images] + [im.name for im in validation_set or []]
        names += [f"--from {old.sha256}"] if old is not None else []
        ignored = ("resume", "workspace", "use_cache", "device", "max_memory_gb", "time_limit")
        params = {k: v for k, v in self.get_params().items() if k not in ignored}
        checkpoint = Checkpoint(workspace, run_key(names, params)) if writable else None
        # under torchrun every rank continues from rank 0's checkpoint (only rank 0 writes one)
        saved = distributed.broadcast_object(checkpoint.load() if self.resume and checkpoint is not None else None)
        resumed_from = None if saved is None else f"{saved['phase']} epoch {saved['epoch']}"
        try:
            head, history, best_epoch = self._train_head(
                x_train, y_train, x_val, y_val, len(labels), device, class_weights, checkpoint, saved
            )
            model = ImageClassifier(
                backbone, head, labels, arch=arch.name, timm_name=arch.timm_name,
                preprocessing=preprocessing, info={}, device=device, engine=self.engine,
            )  # fmt: skip
            tuner = None
            if fine_tune:
                budget = None if plan.time_limit is None else TimeBudget(plan.time_limit, started)
                after = len(uncarved) + 2 * len(held_out)  # the detector's pass, then the evaluation's
                tuner = self._fine_tune(model, images, train.kept, y_train, validation_set, val, y_val, device,
                                        class_weights, checkpoint, saved, history, validation_note, options,
                                        budget, after)  # fmt: skip
                history_ft, best_epoch = tuner.history, tuner.kept_epoch
                history += history_ft
                if tuner.kept == "head-only" and carved:
                    # the held-out photos were only for choosing: the head learns from every training photo,
                    # in their original order, so the model is the one a head-only run would give
                    x_all, y_all = self._xy(from_pool(uncarved), uncarved, labels)
                    model.head, _, _ = self._train_head(x_all, y_all, None, None, len(labels), device,
                                                        self._class_weights(y_all, len(labels)), report=False)  # fmt: skip
            if tuner is None or tuner.kept == "head-only":
                if engine.built is not None and network.module is model._backbone:
                    model.features_engine = engine.built  # the backbone the engine was built from: reuse it
                # trained on from a model, too few new images to hold one out still leaves the old held-out ones
                model.held_out_features_ = from_pool(held_out).features if held_out or old is not None else None
                if self.keep_features_mb > 0:
                    model.stored_features_ = self._features_to_keep(x_train, y_train, x_val, y_val, labels,
                                                                    from_pool(held_out).features, held_out, old)  # fmt: skip
            if old is not None and model.held_out_features_ is not None:
                model.held_out_stored_ = old.stored.part(held_out=True)
        except KeyboardInterrupt:
            if checkpoint is None:
                raise TrainingInterrupted("training interrupted; the workspace is not writable, so no checkpoint "
                                          "was kept and --resume cannot continue") from None  # fmt: skip
            raise TrainingInterrupted(
                f"training interrupted; progress up to the last finished epoch is saved in {checkpoint.path}; "
                "run the same command with --resume to continue"
            ) from None
        model._checkpoint = checkpoint  # removed by model.save(), once the result is safe
        stored_held = 0 if model.held_out_stored_ is None or self.tta else len(model.held_out_stored_[1])
        model.tta = self.tta
        model.info = {
            "weights_source": network.source,
            "training": {**self.get_params(), "best_epoch": best_epoch, "epochs_run": len(history),
                         "train_images": int(len(y_train)), "resumed_from": resumed_from,
                         "held_out_images": len(held_out) + stored_held if hold_out or test_set is not None else None,
                         "validation_images": 0 if y_val is None else int(len(y_val))},
            "history": [asdict(h) for h in history],
            "skipped": [{"file": n, "reason": r} for n, r in skipped],
            **({"fine_tune": tuner.summary()} if tuner is not None else {}),
            "quality": {**plan.record(), "training_seconds": round(time.monotonic() - started, 1)},
            "extraction": {"extracted": pool.extracted, "cached": pool.cached, "engine": engine.name},
            "distributed": {"world_size": distributed.world_size(), "backend": distributed.backend_name()},
            "versions": library_versions(),
            **({"trained_on_from": old.record()} if old is not None else {}),
        }  # fmt: skip
        fine_tuned = tuner is not None and tuner.kept != "head-only"
        if distributed.is_main_process():
            self._fit_unknown(model, uncarved if not fine_tuned else images, held_out, labels, fine_tuned,
                              from_pool, device)  # fmt: skip

            def fit_head(x, y):
                return self._train_head(x, y, None, None, len(labels), device,
                                        self._class_weights(y, len(labels)), report=False)[0]  # fmt: skip

            held = from_pool(held_out) if held_out else ExtractionResult(np.zeros((0, x_train.shape[1]), np.float32), [])
            y_held = np.array([labels.index(im.label) for im in held_out], dtype=np.int64)
            model.info["precision_decision"] = self._decide_precision(
                model, fit_head, (x_new, y_new, images), (held.features, y_held, held_out), fine_tuned
            )
        return model, held_out

    def _plan_quality(self, arch, preprocessing, backbone, features: np.ndarray, training: list[ImageData],
                      old) -> QualityPlan:  # fmt: skip
        """What ``quality`` trains on these photos (:mod:`imgclf.training.presets`), each decision
        said in one line (logger ``imgclf``; the CLI prints it). How far they are from ImageNet is
        read from their pooled features, at no cost (:mod:`imgclf.nets.distance`)."""
        from collections import Counter

        from imgclf.nets.distance import feature_distance, imagenet_feature_moments

        state = backbone if isinstance(backbone, dict) else backbone.state_dict()
        moments = imagenet_feature_moments(arch, state)
        distance = None if moments is None or not len(features) else feature_distance(features, moments)
        why = None
        if old is not None:
            why = "training on from a model (--from) trains its head; the photos it learned from are not kept"
        plan = plan_quality(self.quality, self.fine_tune, self.fine_tune_options, input_size=preprocessing.input_size,
                            distance=distance, fewest_per_label=min(Counter(im.label for im in training).values()),
                            time_limit=parse_duration(self.time_limit), why_head_only=why)  # fmt: skip
        if distributed.is_main_process():
            for line in plan.lines:
                logging.getLogger("imgclf").info("%s", line)
        return plan

    def _fit_unknown(self, model, train_images, held_out, labels, fine_tuned: bool, from_pool,
                     device: str) -> None:  # fmt: skip
        """Fit the unknown-input detector (:mod:`imgclf.inference.unknown`) on the features the
        model itself computes: the cached ones for a head-only model, the fine-tuned backbone's
        otherwise (one more pass over the training and held-out images); record in its metadata
        the share of the held-out images it rejects."""
        from imgclf.inference.unknown import fit_detector
        from imgclf.nets.engines import create_engine

        if fine_tuned:
            engine = create_engine(model.backbone, model.preprocessing.shape, device)
            own = FeatureExtractor(engine, model.preprocessing, "unknown", batch_size=self.extraction_batch_size,
                                   workers=self.workers, progress=False)  # fmt: skip
            result = own.transform(list(train_images) + list(held_out))
            rows = {i: r for r, i in enumerate(result.kept)}
            train_rows = [rows[i] for i in range(len(train_images)) if i in rows]
            held_rows = [rows[i] for i in range(len(train_images), len(train_images) + len(held_out)) if i in rows]
            x, held = result.features[train_rows], result.features[held_rows]
            y = np.array([labels.index(train_images[result.kept[r]].label) for r in train_rows], dtype=np.int64)
        else:
            x, y = self._xy(from_pool(train_images), train_images, labels)
            held = from_pool(held_out).features if held_out else np.zeros((0, x.shape[1]), np.float32)
        detector = fit_detector(x, y, self.unknown_rate, seed=self.seed)
        detector.measured["features"] = "fine-tuned backbone" if fine_tuned else "pretrained backbone"
        detector.measure_held_out(held)
        model.unknown_ = detector

    def _decide_precision(self, model, fit_head, train, held, fine_tuned: bool) -> dict:
        """Prepare and certify what ``precision`` asks for; returns the decision, said in one line
        (``line``), with the certificate recorded in ``model.info["precision_metrics"]``."""
        from imgclf.nets.cpu import cpu_capabilities
        from imgclf.nets.engines import CERTIFY_MIN_IMAGES, certificate_verdict, installed
        from imgclf.training.certify import certify_after_training

        caps = cpu_capabilities()
        asked = self.precision
        decision = {"asked": asked, "cpu": caps.to_dict()}
        if asked == "fp32" or model.device != "cpu":
            return {**decision, "line": f"fp32 ({'asked for' if asked == 'fp32' else model.device})"}
        if asked == "int8":
            from imgclf.inference.precision import calibrate_int8, measure_precisions, record_certificate

            calibrate_int8(model, train[2])
            if len(held[2]):
                record_certificate(model, "int8", measure_precisions(model, held[2], ["fp32", "int8"])["int8"])
            said = certificate_verdict(model.info.get("precision_metrics"), "int8", caps)[1]
            return {**decision, "line": f"int8 calibrated on the training images; auto: {said}"}
        if not caps.bf16:
            return {**decision, "line": f"fp32: this CPU has no native bf16 ({caps.source}); int8 only when asked "
                                        "(--precision int8)"}  # fmt: skip
        images = len(train[1]) + len(held[1])
        if asked == "auto" and (not installed("openvino") or images < CERTIFY_MIN_IMAGES):
            why = (f"bf16 needs OpenVINO: {install_hint('openvino')}" if not installed("openvino") else
                   f"{images} images are too few to certify bf16 (needs {CERTIFY_MIN_IMAGES} the head did not "
                   "see); 'imgclf certify MODEL NEW_IMAGES' measures it on images the model never saw")  # fmt: skip
            return {**decision, "line": f"fp32: {why}"}
        certify_after_training(fit_head, model, "bf16", train, held, fine_tuned=fine_tuned, seed=self.seed)
        ok, said = certificate_verdict(model.info.get("precision_metrics"), "bf16", caps)
        return {**decision, "line": f"{'bf16' if ok else 'fp32'}: {said}"}

    def _features_to_keep(self, x_train, y_train, x_val, y_val, labels, x_held, held_out, old):
        """The features the model keeps for ``train --from``: its training and validation images'
        (with the old model's, when trained on from one) and, marked, its held-out images'."""
        from imgclf.inference.stored import StoredFeatures

        if x_val is not None:
            x_train, y_train = np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val])
        y_held = np.array([labels.index(im.label) for im in held_out], dtype=np.int64)
        if old is not None:
            x_old, y_old = old.stored.part(held_out=True)
            x_held, y_held = np.concatenate([x_held, x_old]), np.concatenate([y_held, y_old])
        return StoredFeatures.select((x_train, y_train), (x_held, y_held), self.keep_features_mb, self.seed)

    def _workspace(self) -> tuple[Path, bool]:
        """The workspace, and whether files can be written there.

        A read-only workspace (a container's read-only file system, a shared
        cache) is not an error: training goes on without writing features or
        checkpoints, reading any features already cached there, after one warning.
        """
        workspace = Path(self.workspace or default_workspace())
        try:
            workspace.mkdir(parents=True, exist_ok=True)
            probe = workspace / f".imgclf-write-test-{os.getpid()}"
            probe.touch()
            probe.unlink()
            return workspace, True
        except OSError as e:
            warnings.warn(f"workspace {workspace} is not writable ({e.strerror or e}): training without writing "
                          "cached features or checkpoints, so --resume cannot continue this run", stacklevel=4)  # fmt: skip
            return workspace, False

    def get_params(self) -> dict:
        """The options, JSON-friendly (recorded in the model file)."""
        skip = ("metrics_callback", "progress", "workers", "fine_tune_options", "tracking", "tracker_")
        params = {k: v for k, v in vars(self).items() if k not in skip and not (k == "frame" and v is None)}
        params["early_stopping"] = asdict(self.early_stopping) if self.early_stopping else None
        params["fine_tune_options"] = asdict(self.fine_tune_options or FineTuneOptions()) if self.fine_tune else None
        for key in ("weights", "workspace", "from_model"):
            params[key] = None if params[key] is None else str(params[key])
        return params

    @staticmethod
    def _xy(result: ExtractionResult, images: Sequence[ImageData], labels: list[str]):
        y = np.array([labels.index(images[i].label) for i in result.kept], dtype=np.int64)
        return result.features, y

    def _class_weights(self, y: np.ndarray, n_classes: int):
        """``balanced``: each label weighs n / (labels x its count), as scikit-learn does."""
        if self.class_weight != "balanced":
            return None
        import torch

        counts = np.bincount(y, minlength=n_classes).astype(np.float64)
        return torch.tensor(len(y) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32)

    def _fine_tune(self, model, images, kept, y_train, validation_set, val, y_val, device, class_weights,
                   checkpoint, saved, head_history, validation_note: str | None, options: FineTuneOptions,
                   budget: TimeBudget | None, passes_after: int):  # fmt: skip
        from imgclf.data.streaming import training_pictures
        from imgclf.training.finetune import FineTuner, decode_for_training, log

        decode = partial(decode_for_training, prep=model.preprocessing, workers=self.workers)

        def pictures_of(chosen):  # decoded in memory, or streamed from disk when over max_memory_gb
            return training_pictures(chosen, model.preprocessing, decode, self.max_memory_gb,
                                     int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # fmt: skip

        pictures = pictures_of([images[i] for i in kept])
        val_pictures = None
        if val is not None and len(val.kept):
            val_pictures = pictures_of([validation_set[i] for i in val.kept])
        tuner = FineTuner(model, options, device=device, seed=self.seed, tta=self.tta, class_weights=class_weights,
                          callback=self._report_epoch, early_stopping=self.early_stopping, checkpoint=checkpoint,
                          budget=budget, passes_after=passes_after)  # fmt: skip
        if validation_note:
            log.info("fine-tune: %s", validation_note)
        tuner.run(pictures, y_train, val_pictures, y_val, saved, prior_history=head_history)
        if validation_note:
            tuner.recipe.decisions.insert(0, validation_note)
        return tuner

    def _train_head(self, x_train, y_train, x_val, y_val, n_classes: int, device: str, class_weights=None,
                    checkpoint: Checkpoint | None = None, saved: dict | None = None, report: bool = True,
                    loss_fn=None, score_fn=None):  # fmt: skip
        """The linear head on pooled features: SGD, the schedule, early stopping, checkpoints.
        Softmax cross-entropy by default; ``loss_fn(logits, y)`` and ``score_fn(logits, y) ->
        (accuracy, loss)`` give another objective (the multi-label head's, :mod:`.multilabel`)."""
        import torch
        import torch.nn.functional as F

        torch.manual_seed(self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        xt = torch.from_numpy(x_train).to(device)
        yt = torch.from_numpy(y_train).to(device)
        xv = None if x_val is None else torch.from_numpy(x_val).to(device)
        yv = None if y_val is None else torch.from_numpy(y_val).to(device)
        weight = None if class_weights is None else class_weights.to(device)
        head = torch.nn.Linear(xt.shape[1], n_classes).to(device)
        torch.nn.init.zeros_(head.weight)  # softmax regression: a zero start is deterministic and converges
        torch.nn.init.zeros_(head.bias)
        optimizer = HeadSGD(head.parameters(), lr=self.learning_rate, momentum=self.momentum,
                            nesterov=self.momentum > 0, weight_decay=self.weight_decay)  # fmt: skip
        best = BestEpoch(self.early_stopping)
        history: list[EpochMetrics] = []
        start = 0
        if saved is not None:
            if saved["phase"] == "fine-tune":  # the head phase had finished: take its result
                head.load_state_dict({k[5:]: v for k, v in saved["tensors"].items() if k.startswith("head.")})
                history = [EpochMetrics(**h) for h in saved["history"] if h.get("phase", "head") == "head"]
                return head.eval(), history, saved["extra"].get("head_best_epoch", len(history))
            checkpoint.restore(saved, {"head": head}, optimizer, generator)
            start = saved["epoch"]
            history = [EpochMetrics(**h) for h in saved["history"]]
            best.resume(saved)

        def measure(x, y):
            with torch.no_grad():
                logits = head(x)
                if score_fn is not None:
                    return score_fn(logits, y)
                return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))

        def loss_of(logits, y):
            return F.cross_entropy(logits, y, weight=weight) if loss_fn is None else loss_fn(logits, y)

        for epoch in range(start, self.epochs):
            lr = learning_rate_at(epoch, self.learning_rate, self.lr_schedule, self.epochs, self.decay_rate,
                                  self.decay_epochs, self.end_learning_rate, self.power)  # fmt: skip
            for group in optimizer.param_groups:
                group["lr"] = lr
            head.train()
            order = torch.randperm(len(yt), generator=generator).to(device)
            for start_i in range(0, len(yt), self.batch_size):
                idx = order[start_i : start_i + self.batch_size]
                loss = loss_of(head(xt[idx]), yt[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            head.eval()
            m = EpochMetrics(epoch + 1, lr, *measure(xt, yt))
            if not math.isfinite(m.train_loss):
                raise OptionError(f"training diverged in epoch {epoch + 1} (the loss is not a finite number); "
                                  f"lower the learning rate (now {self.learning_rate:g})")  # fmt: skip
            if xv is not None and len(xv):
                m.validation_accuracy, m.validation_loss = measure(xv, yv)
            history.append(m)
            if report:
                self._report_epoch(m)
            watched = ((m.validation_accuracy, m.validation_loss) if m.validation_loss is not None
                       else (m.train_accuracy, m.train_loss))  # fmt: skip
            done = best.update(epoch + 1, *watched, {"head": head})
            if checkpoint is not None:
                states, extra = best.checkpoint_parts()
                checkpoint.save("head", epoch + 1 if not done else self.epochs, {"head": head, **states}, optimizer,
                                generator, [asdict(h) for h in history], extra)  # fmt: skip
            if done:
                break
        best.restore_best({"head": head})
        return head.eval(), history, best.epoch or len(history)
