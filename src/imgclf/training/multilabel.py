"""Multi-label training: a sigmoid head on the frozen backbone's cached features.

A dataset whose images carry sets of labels (a manifest cell ``"a;b"``, or a list) trains a
model that answers a set: one logistic output per label, trained with binary cross-entropy,
and per label the probability from which it is answered, chosen for the best F1 on the
validation images (or, with none, on out-of-fold predictions of the training images: each
fold's head never saw the images it scores, so the thresholds are not chosen on memorised
answers).

The images are resized whole (``Preprocessing.frame="whole"``): the objects of a multi-label
photo often sit at its edges, where the single-label centre crop cuts them off; images wider
or taller than 3:2 go in at their aspect rather than squeezed into the square
(``Preprocessing.input_shape``; both measured in docs/benchmarks.md). Fine-tuning, training on from a model,
checkpoints, several processes and bf16/int8 certification are single-label only for now,
and each is refused in one line here rather than trained wrongly.
"""

from __future__ import annotations

import logging
import random
import warnings
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

import numpy as np

from imgclf.data.images import ImageData, check_labels, label_names, label_set
from imgclf.data.imaging import Preprocessing, input_shape_for, oriented_size
from imgclf.data.splits import train_test_split
from imgclf.errors import DataError, OptionError
from imgclf.inference.model import ImageClassifier, head_probabilities, library_versions
from imgclf.inference.multilabel import choose_thresholds, label_matrix
from imgclf.nets.archs import get_architecture, preprocessing_for
from imgclf.nets.features import FeatureExtractor
from imgclf.nets.pretrained import PretrainedNetwork
from imgclf.options import option_error
from imgclf.training import distributed
from imgclf.training.presets import plan_quality

#: What these functions read their options from: an ``imgclf.training.trainer.ImageClassificationTrainer``
#: (not imported: the trainer imports this module).
Trainer = Any

#: The preprocessing a multi-label model uses unless told otherwise (see the module's docstring).
DEFAULT_FRAME = "whole"
#: Folds of the training images whose out-of-fold predictions choose the thresholds without validation.
THRESHOLD_FOLDS = 5
#: Training images whose headers give the whole frame's aspect (a median: a sample says it).
ASPECT_SAMPLE = 200


def refuse_unsupported(trainer: Trainer) -> None:
    """One line for each option multi-label training does not do yet (before any work)."""
    if trainer.fine_tune:
        raise option_error("fine_tune", "{fine_tune}: multi-label models train their head only for now; drop "
                                        "{fine_tune}")  # fmt: skip
    if trainer.quality == "best":
        raise option_error("quality", "{quality} best: multi-label models train their head only for now; choose "
                                      "balanced or fast")  # fmt: skip
    if trainer.from_model is not None:
        raise option_error("from_model", "{from_model}: these images have sets of labels (multi-label), and "
                                         "training on from a model is single-label only for now; train on the "
                                         "old and new photos together")  # fmt: skip
    if trainer.resume:
        raise option_error("resume", "{resume}: multi-label training keeps no checkpoint (its head trains in seconds "
                                     "on cached features); drop {resume}")  # fmt: skip
    if trainer.precision not in ("auto", "fp32"):
        raise option_error("precision", f"{{precision}} {trainer.precision}: multi-label models are not certified "
                                        "at bf16 or int8 yet; use auto or fp32")  # fmt: skip
    if distributed.world_size() > 1:
        raise OptionError("multi-label training runs in one process for now; drop --nproc-per-node")


def _with_their_aspect(prep: Preprocessing, images: list[ImageData], seed: int) -> Preprocessing:
    """The whole frame at the training images' median aspect (:func:`imgclf.data.imaging.input_shape_for`),
    from the headers of up to :data:`ASPECT_SAMPLE` of them; said in one line."""
    sample = random.Random(seed).sample(images, min(len(images), ASPECT_SAMPLE))
    aspects = []
    for image in sample:
        try:
            width, height = oriented_size(image.source, image.name)
        except Exception:  # an unreadable image is skipped and listed by the feature pass
            continue
        aspects.append(width / max(1, height))
    aspect = float(np.median(aspects)) if aspects else 1.0
    shape = input_shape_for(aspect, prep.input_size)
    said = (f"{shape[1]}x{shape[0]} (width x height), their aspect" if shape else
            f"the {prep.input_size}x{prep.input_size} square, near enough to")  # fmt: skip
    logging.getLogger("imgclf").info("frame whole: the images resized whole to %s (the median width / height of "
                                     "%d training images is %.2f)", said, len(aspects), aspect)  # fmt: skip
    return replace(prep, input_shape=shape)


def _check_labels(images: list[ImageData], others: Sequence[tuple[str, list[ImageData] | None]]) -> list[str]:
    labels = check_labels(images)  # every image labelled, names are text, at least two labels
    for part, given in others:
        unknown = sorted(set(label_names(given or [])) - set(labels))
        if unknown:
            raise DataError(f"{part} set has labels not in the training set: {', '.join(unknown)}")
    return labels


def fit_multilabel(trainer: Trainer, images: list[ImageData],
                   validation_set: list[ImageData] | None, test_set: list[ImageData] | None,
                   hold_out: float | None) -> tuple[ImageClassifier, list[ImageData]]:  # fmt: skip
    """What :meth:`ImageClassificationTrainer._fit` does, for images with sets of labels."""
    from imgclf.nets.device import resolve_device

    refuse_unsupported(trainer)
    trainer._check_options()
    plan = plan_quality(trainer.quality, trainer.fine_tune, None, input_size=0, distance=None, fewest_per_label=0,
                        time_limit=None, why_head_only="multi-label models train their head only for now")  # fmt: skip
    logging.getLogger("imgclf").info("%s", plan.lines[0])
    labels = _check_labels(images, (("validation", validation_set), ("test", test_set)))
    device = resolve_device(trainer.device)
    arch = get_architecture(trainer.arch)
    preprocessing = replace(preprocessing_for(arch), frame=trainer.frame or DEFAULT_FRAME)
    if preprocessing.frame == "whole":
        preprocessing = _with_their_aspect(preprocessing, images, trainer.seed)
    network = PretrainedNetwork(arch, trainer.weights, device, trainer.engine, preprocessing.shape)
    engine = network.feature_engine()
    workspace, writable = trainer._workspace()
    extractor = FeatureExtractor(engine, preprocessing, network.cache_key, batch_size=trainer.extraction_batch_size,
                                 workers=trainer.workers, workspace=workspace if trainer.use_cache else None,
                                 cache_writable=writable, progress=trainer.progress)  # fmt: skip
    if extractor.cache is not None:
        network.keep_tensors_in(extractor.cache.folder, writable)

    everything = images + (test_set or [])
    pool = extractor.transform(everything)
    skipped = list(pool.failures)
    readable = [everything[i] for i in pool.kept]
    row_of = {id(im): r for r, im in enumerate(readable)}
    held_out: list[ImageData] = []
    if test_set is not None:
        in_test = {id(im) for im in test_set}
        held_out = [im for im in readable if id(im) in in_test]
        readable = [im for im in readable if id(im) not in in_test]
    elif hold_out:
        readable, held_out = _split(readable, hold_out, trainer.seed, "held-out", labels)

    def features(part: list[ImageData]) -> np.ndarray:
        return pool.features[[row_of[id(im)] for im in part]]

    x_val = y_val = None
    if validation_set is None and trainer.validation_fraction:
        readable, validation_set = _split(readable, trainer.validation_fraction, trainer.seed, "validation", labels)
        x_val = features(validation_set)
    elif validation_set:
        val = extractor.transform(validation_set)
        skipped += val.failures
        validation_set = [validation_set[i] for i in val.kept]
        x_val = val.features
    if x_val is not None:
        y_val = label_matrix([label_set(im) for im in validation_set], labels)
    empty = [lbl for lbl in labels if not any(lbl in label_set(im) for im in readable)]
    if empty:
        raise DataError(f"label '{empty[0]}' has no readable training image left; add images of it")
    for name, reason in skipped:
        warnings.warn(f"skipped {reason}" if reason.startswith(name) else f"skipped {name}: {reason}", stacklevel=3)

    x_train = features(readable)
    y_train = label_matrix([label_set(im) for im in readable], labels)
    head, history, best_epoch = train_sigmoid_head(trainer, x_train, y_train, x_val, y_val, device)
    if x_val is not None and len(x_val):
        thresholds = choose_thresholds(head_probabilities(head, x_val, multilabel=True), y_val)
        chosen_on = f"the {len(x_val)} validation images"
    else:
        thresholds, folds = _cross_fitted_thresholds(trainer, x_train, y_train, device)
        chosen_on = f"out-of-fold predictions of the training images ({folds} folds)"
    model = ImageClassifier(network.for_model(), head, labels, arch=arch.name, timm_name=arch.timm_name,
                            preprocessing=preprocessing, info={}, device=device, engine=trainer.engine,
                            tta=trainer.tta, thresholds=thresholds)  # fmt: skip
    if engine.built is not None and network.module is model._backbone:
        model.features_engine = engine.built
    model.held_out_features_ = features(held_out) if held_out else None
    model.unknown_ = _fit_unknown(trainer, x_train, y_train, model.held_out_features_)
    model.info = {
        "weights_source": network.source,
        "training": {**trainer.get_params(), "best_epoch": best_epoch, "epochs_run": len(history),
                     "train_images": len(readable), "resumed_from": None,
                     "held_out_images": len(held_out) if hold_out or test_set is not None else None,
                     "validation_images": 0 if x_val is None else len(x_val),
                     "thresholds_chosen_on": chosen_on},
        "history": [asdict(h) for h in history],
        "skipped": [{"file": n, "reason": r} for n, r in skipped],
        "extraction": {"extracted": pool.extracted, "cached": pool.cached, "engine": engine.name},
        "distributed": {"world_size": 1, "backend": distributed.backend_name()},
        "versions": library_versions(),
        "quality": plan.record(),
        "precision_decision": {"asked": trainer.precision, "line": "fp32 (multi-label models are not certified at "
                               "bf16 or int8 yet)"},
    }  # fmt: skip
    return model, held_out


def _fit_unknown(trainer: Trainer, x_train: np.ndarray, y_train: np.ndarray, held: np.ndarray | None):
    """The unknown-input detector (:mod:`imgclf.inference.unknown`), as single-label models have it:
    on the same pooled features, label-free, its cross-fitting folds stratified by each image's
    first label; with the share of the held-out images it rejects."""
    from imgclf.inference.unknown import fit_detector

    detector = fit_detector(x_train, y_train.argmax(axis=1), trainer.unknown_rate, seed=trainer.seed)
    detector.measured["features"] = "pretrained backbone"
    detector.measure_held_out(held)
    return detector


def _split(images: list[ImageData], fraction: float, seed: int, part: str, labels: list[str]):
    """A seeded split stratified by each image's set of labels; warns about labels the second part misses."""
    first, second = train_test_split(images, fraction, seed)
    missing = sorted(set(labels) - set(label_names(second)))
    if missing:
        warnings.warn(f"label(s) {', '.join(missing)} have too few readable images to keep one in the {part} set; "
                      "they are not measured there", stacklevel=4)  # fmt: skip
    return first, second


def _cross_fitted_thresholds(trainer, x: np.ndarray, y: np.ndarray, device: str) -> tuple[list[float], int]:
    """Thresholds chosen on out-of-fold probabilities: each image scored by a head that never saw it."""
    folds = max(2, min(THRESHOLD_FOLDS, len(x) // 2))
    order = list(range(len(x)))
    random.Random(trainer.seed).shuffle(order)
    fold_of = np.empty(len(x), np.int64)
    fold_of[order] = np.arange(len(x)) % folds
    out_of_fold = np.zeros_like(y)
    for k in range(folds):
        fit, score = fold_of != k, fold_of == k
        head, _, _ = train_sigmoid_head(trainer, x[fit], y[fit], None, None, device, report=False)
        out_of_fold[score] = head_probabilities(head, x[score], multilabel=True)
    return choose_thresholds(out_of_fold, y), folds


def train_sigmoid_head(trainer, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray | None,
                       y_val: np.ndarray | None, device: str, report: bool = True):  # fmt: skip
    """A linear head with one sigmoid per label, trained with binary cross-entropy by the
    trainer's SGD, schedule and early stopping (the single-label head's recipe with the loss
    that fits). The reported accuracy is the share of image-label decisions right at 0.5
    (1 - hamming loss). Returns (head, history, best epoch)."""
    import torch
    import torch.nn.functional as F

    pos_weight = None
    if trainer.class_weight == "balanced":  # each label's positives weigh as much as its negatives
        positives = y_train.sum(0)
        pos_weight = torch.tensor((len(y_train) - positives) / np.maximum(positives, 1), dtype=torch.float32)
        pos_weight = pos_weight.to(device)

    def loss_fn(logits, y):
        return F.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight)

    def score_fn(logits, y):  # decisions right at 0.5, and the unweighted loss
        return float(((logits >= 0) == (y > 0.5)).float().mean()), float(F.binary_cross_entropy_with_logits(logits, y))

    return trainer._train_head(x_train, y_train, x_val, y_val, y_train.shape[1], device, report=report,
                               loss_fn=loss_fn, score_fn=score_fn)  # fmt: skip

