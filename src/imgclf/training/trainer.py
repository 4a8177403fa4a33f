"""Training: ML.NET's ImageClassificationTrainer, done well.

The pretrained backbone stays frozen. Its pooled features are computed once
per image (and cached, ``imgclf.nets.features``), then a softmax head is trained on
them with mini-batch SGD, a learning-rate schedule and optional early stopping
that keeps the best epoch's weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from imgclf.data.images import ImageData, check_labels
from imgclf.data.splits import train_test_split
from imgclf.errors import DataError, OptionError
from imgclf.inference.model import ImageClassifier, library_versions
from imgclf.nets.archs import DEFAULT_ARCH, create_backbone, get_architecture, preprocessing_for
from imgclf.nets.engines import create_engine
from imgclf.nets.features import ExtractionResult, FeatureExtractor
from imgclf.nets.workspace import default_workspace
from imgclf.training.checkpoint import Checkpoint, TrainingInterrupted, run_key
from imgclf.training.finetune import FineTuneOptions, carve_validation
from imgclf.training.history import BestEpoch, EarlyStopping, EpochMetrics

LR_SCHEDULES = ("exponential", "polynomial", "constant")


def learning_rate_at(
    epoch: int,
    base: float,
    schedule: str,
    epochs: int,
    decay_rate: float,
    decay_epochs: int,
    end_lr: float,
    power: float,
) -> float:
    """The learning rate for (0-based) ``epoch`` under ``schedule``."""
    if schedule == "exponential":  # ML.NET's ExponentialLRDecay (staircase)
        return base * decay_rate ** (epoch // decay_epochs)
    if schedule == "polynomial":  # ML.NET's PolynomialLRDecay
        frac = min(epoch, epochs) / max(1, epochs)
        return (base - end_lr) * (1 - frac) ** power + end_lr
    return base


class ImageClassificationTrainer:
    """Retrains a pretrained ImageNet network on your labelled images.

    Options are stored as given; they are checked when :meth:`fit` runs.
    ``fit`` returns an :class:`ImageClassifier` that answers ``predict``,
    ``predict_batch``, ``evaluate`` and ``save``.
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
        fine_tune: bool = False,
        fine_tune_options: FineTuneOptions | None = None,
        tta: bool = False,
        resume: bool = False,
        metrics_callback: Callable[[EpochMetrics], None] | None = None,
        seed: int = 1,
        weights: str | Path | None = None,
        device: str = "auto",
        engine: str = "auto",
        workspace: str | Path | None = None,
        use_cache: bool = True,
        extraction_batch_size: int = 32,
        workers: int | None = None,
        progress: bool = True,
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
        self.fine_tune = fine_tune
        self.fine_tune_options = fine_tune_options
        self.tta = tta
        self.resume = resume
        self.metrics_callback = metrics_callback
        self.seed = seed
        self.weights = weights
        self.device = device
        self.engine = engine
        self.workspace = workspace
        self.use_cache = use_cache
        self.extraction_batch_size = extraction_batch_size
        self.workers = workers
        self.progress = progress

    def _check_options(self) -> None:
        def positive(name: str, integer: bool) -> None:
            value = getattr(self, name)
            if (integer and not isinstance(value, int)) or not value > 0:
                raise OptionError(f"{name} must be a positive {'integer' if integer else 'number'}, got {value!r}")

        for name in ("epochs", "batch_size", "decay_epochs", "extraction_batch_size"):
            positive(name, True)
        for name in ("learning_rate", "decay_rate"):
            positive(name, False)
        if self.lr_schedule not in LR_SCHEDULES:
            raise OptionError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got '{self.lr_schedule}'")
        if self.validation_fraction is not None and not 0 < self.validation_fraction < 1:
            raise OptionError(f"validation_fraction must be between 0 and 1, got {self.validation_fraction}")
        if not 0 <= self.momentum < 1:
            raise OptionError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise OptionError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.class_weight not in (None, "balanced"):
            raise OptionError(f"class_weight must be 'balanced' or None, got {self.class_weight!r}")
        if self.fine_tune_options is not None:
            self.fine_tune_options.validate()  # again: its fields may have been changed since

    def fit(self, images: Sequence[ImageData], validation_set: Sequence[ImageData] | None = None) -> ImageClassifier:
        """Train on labelled ``images``; returns the trained classifier.

        Unreadable images are skipped with a warning (listed in
        ``model.info["skipped"]``); a label left without any usable image is
        an error. ``validation_set`` (or ``validation_fraction``) drives early
        stopping and the per-epoch validation metrics.
        """
        from imgclf.nets.device import resolve_device

        self._check_options()
        labels = check_labels(images)
        if validation_set is None and self.validation_fraction:
            images, validation_set = train_test_split(images, self.validation_fraction, self.seed)
        validation_note, held_out = None, False  # fine-tuning holds out its own validation photos if none are given
        if self.fine_tune and validation_set is None:
            options = self.fine_tune_options or FineTuneOptions()
            images, validation_set, validation_note = carve_validation(images, options, self.seed)
            held_out = validation_set is not None
        if validation_set is not None:
            unknown = sorted({im.label for im in validation_set} - set(labels))
            if unknown:
                raise DataError(f"validation set has labels not in the training set: {', '.join(map(str, unknown))}")

        device = resolve_device(self.device)
        arch = get_architecture(self.arch)
        backbone, weights_source = create_backbone(arch, self.weights)
        preprocessing = preprocessing_for(arch)
        backbone = backbone.to(device)
        engine = create_engine(backbone, preprocessing.input_size, device, self.engine)
        workspace = (self.workspace or default_workspace()) if self.use_cache else None
        extractor = FeatureExtractor(
            engine, preprocessing, f"{arch.name}|{arch.timm_name}|{weights_source}",
            batch_size=self.extraction_batch_size, workers=self.workers, workspace=workspace, progress=self.progress,
        )  # fmt: skip

        train = extractor.transform(images)
        skipped = list(train.failures)
        x_train, y_train = self._xy(train, images, labels)
        empty = [lbl for i, lbl in enumerate(labels) if not (y_train == i).any()]
        if empty:
            raise DataError(f"label '{empty[0]}' has no readable image left; add images or remove the folder")
        x_val = y_val = None
        val = None
        if validation_set is not None and len(validation_set):
            val = extractor.transform(validation_set)
            skipped += val.failures
            if len(val.kept):
                x_val, y_val = self._xy(val, validation_set, labels)
        for name, reason in skipped:
            warnings.warn(f"skipped {reason}" if reason.startswith(name) else f"skipped {name}: {reason}", stacklevel=2)

        class_weights = self._class_weights(y_train, len(labels))
        names = [im.name for im in images] + [im.name for im in validation_set or []]
        params = {k: v for k, v in self.get_params().items() if k not in ("resume", "workspace", "use_cache", "device")}
        checkpoint = Checkpoint(self.workspace or default_workspace(), run_key(names, params))
        saved = checkpoint.load() if self.resume else None
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
            if self.fine_tune:
                tuner = self._fine_tune(model, images, train.kept, y_train, validation_set, val, y_val, device,
                                        class_weights, checkpoint, saved, history, validation_note)  # fmt: skip
                history_ft, best_epoch = tuner.history, tuner.kept_epoch
                history += history_ft
                if tuner.kept == "head-only" and held_out and x_val is not None:
                    # the held-out photos were only for choosing: the head-only model learns from them too
                    model.head, _, _ = self._train_head(np.concatenate([x_train, x_val]),
                                                        np.concatenate([y_train, y_val]), None, None, len(labels),
                                                        device, class_weights, report=False)  # fmt: skip
            if tuner is None or tuner.kept == "head-only":
                model.features_engine = engine  # the backbone is the one the engine was built from: reuse it
        except KeyboardInterrupt:
            raise TrainingInterrupted(
                f"training interrupted; progress up to the last finished epoch is saved in {checkpoint.path}; "
                "run the same command with --resume to continue"
            ) from None
        checkpoint.remove()
        model.tta = self.tta
        model.info = {
            "weights_source": weights_source,
            "training": {**self.get_params(), "best_epoch": best_epoch, "epochs_run": len(history),
                         "train_images": int(len(y_train)), "resumed_from": resumed_from,
                         "validation_images": 0 if y_val is None else int(len(y_val))},
            "history": [asdict(h) for h in history],
            "skipped": [{"file": n, "reason": r} for n, r in skipped],
            **({"fine_tune": tuner.summary()} if tuner is not None else {}),
            "extraction": {"extracted": train.extracted, "cached": train.cached, "engine": engine.name},
            "versions": library_versions(),
        }  # fmt: skip
        return model

    def get_params(self) -> dict:
        """The options, JSON-friendly (recorded in the model file)."""
        skip = ("metrics_callback", "progress", "workers", "fine_tune_options")
        params = {k: v for k, v in vars(self).items() if k not in skip}
        params["early_stopping"] = asdict(self.early_stopping) if self.early_stopping else None
        params["fine_tune_options"] = asdict(self.fine_tune_options or FineTuneOptions()) if self.fine_tune else None
        for key in ("weights", "workspace"):
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
                   checkpoint, saved, head_history, validation_note: str | None):  # fmt: skip
        from imgclf.training.finetune import FineTuner, decode_for_training, log

        train_images = [images[i] for i in kept]
        pictures = decode_for_training(train_images, model.preprocessing, self.workers)
        val_pictures = None
        if val is not None and len(val.kept):
            val_pictures = decode_for_training([validation_set[i] for i in val.kept], model.preprocessing, self.workers)
        tuner = FineTuner(model, self.fine_tune_options or FineTuneOptions(), device=device, seed=self.seed,
                          tta=self.tta, class_weights=class_weights, callback=self.metrics_callback,
                          early_stopping=self.early_stopping, checkpoint=checkpoint)  # fmt: skip
        if validation_note:
            log.info("fine-tune: %s", validation_note)
        tuner.run(pictures, y_train, val_pictures, y_val, saved, prior_history=head_history)
        if validation_note:
            tuner.recipe.decisions.insert(0, validation_note)
        return tuner

    def _train_head(self, x_train, y_train, x_val, y_val, n_classes: int, device: str, class_weights=None,
                    checkpoint: Checkpoint | None = None, saved: dict | None = None, report: bool = True):  # fmt: skip
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
        optimizer = torch.optim.SGD(head.parameters(), lr=self.learning_rate, momentum=self.momentum,
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
                return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))

        for epoch in range(start, self.epochs):
            lr = learning_rate_at(epoch, self.learning_rate, self.lr_schedule, self.epochs, self.decay_rate,
                                  self.decay_epochs, self.end_learning_rate, self.power)  # fmt: skip
            for group in optimizer.param_groups:
                group["lr"] = lr
            head.train()
            order = torch.randperm(len(yt), generator=generator).to(device)
            for start_i in range(0, len(yt), self.batch_size):
                idx = order[start_i : start_i + self.batch_size]
                loss = F.cross_entropy(head(xt[idx]), yt[idx], weight=weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            head.eval()
            m = EpochMetrics(epoch + 1, lr, *measure(xt, yt))
            if xv is not None:
                m.validation_accuracy, m.validation_loss = measure(xv, yv)
            history.append(m)
            if self.metrics_callback is not None and report:
                self.metrics_callback(m)
            watched = (m.validation_accuracy, m.validation_loss) if xv is not None else (m.train_accuracy, m.train_loss)
            done = best.update(epoch + 1, *watched, {"head": head})
            if checkpoint is not None:
                states, extra = best.checkpoint_parts()
                checkpoint.save("head", epoch + 1 if not done else self.epochs, {"head": head, **states}, optimizer,
                                generator, [asdict(h) for h in history], extra)  # fmt: skip
            if done:
                break
        best.restore_best({"head": head})
        return head.eval(), history, best.epoch or len(history)
