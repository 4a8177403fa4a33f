"""Certifying a lossy precision (bf16, int8) at training time, on images the head never saw.

``precision="auto"`` takes a lossy precision only with a certificate in the model file
(:func:`imgclf.nets.engines.certificate_verdict`): top labels equal to fp32 on at least
99% of at least 300 images the head was not fitted on. Agreement on training images
overstates it (a head fitted on an image is confident about it), and the held-out
share alone is small (40 of the 200 bundled flowers), so training cross-fits: each of
k folds of the training images is scored by a head fitted on the other folds, from
the cached fp32 features and from the lossy precision's features, and the held-out
images by the model's own head. Every readable image then counts, none of them seen
by the head that scored it. It costs one pass of the network at the lossy precision
and k small head fits, so it runs only where it can certify: on a CPU with native
bf16, with enough images (the bundled flowers are too few: the main job stays fast).
A fine-tuned backbone's features are not the cached ones, so a fine-tuned model is
measured on its held-out images alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from imgclf.data.images import ImageData
from imgclf.inference.model import head_probabilities
from imgclf.inference.precision import compare_to_fp32, measure_precisions, record_certificate
from imgclf.inference.unknown import stratified_folds as _folds  # one fold-maker: the detector's threshold too
from imgclf.nets.engines import EngineChoice, create_engine
from imgclf.nets.features import FeatureExtractor

FOLDS = 5


def lossy_features(model, images: Sequence[ImageData], precision: str, workers: int | None = None):
    """The backbone's features of ``images`` at ``precision`` (OpenVINO), never cached."""
    choice = EngineChoice("openvino", precision, "certifying")
    engine = create_engine(model.backbone, model.preprocessing.shape, "cpu", choice)
    return FeatureExtractor(engine, model.preprocessing, "certify", workers=workers, progress=False).transform(images)


def cross_fitted_certificate(
    fit_head,
    model,
    precision: str,
    train: tuple[np.ndarray, np.ndarray, Sequence[ImageData]],
    held_out: tuple[np.ndarray, np.ndarray, Sequence[ImageData]],
    *,
    seed: int = 1,
    folds: int = FOLDS,
) -> dict:
    """The certificate entry for ``precision`` from out-of-fold training images and the held-out ones.

    ``fit_head(x, y)`` fits a head as training did; ``train`` and ``held_out`` are
    (fp32 features, label indices, images), rows aligned.
    """
    x_train, y_train, train_images = train
    x_held, y_held, held_images = held_out
    images = list(train_images) + list(held_images)
    lossy = lossy_features(model, images, precision)
    keep = np.zeros(len(images), bool)
    keep[lossy.kept] = True
    rows = {i: r for r, i in enumerate(lossy.kept)}
    reference, measured, targets = [], [], []
    for fold in _folds(y_train, folds, seed):
        fold = np.asarray([i for i in fold if keep[i]], int)
        if not len(fold):
            continue
        others = np.setdiff1d(np.arange(len(y_train)), fold)
        if not len(others):  # so few training images that one fold holds them all: no head without it
            continue
        head = fit_head(x_train[others], y_train[others])
        reference.append(head_probabilities(head, x_train[fold]))
        measured.append(head_probabilities(head, lossy.features[[rows[i] for i in fold]]))
        targets.extend(y_train[fold].tolist())
    held = [i for i in range(len(held_images)) if keep[len(train_images) + i]]
    if held:
        reference.append(head_probabilities(model.head, x_held[held]))
        measured.append(head_probabilities(model.head, lossy.features[[rows[len(train_images) + i] for i in held]]))
        targets.extend(y_held[held].tolist())
    empty = np.zeros((0, len(model.labels)))
    ref, probs = np.concatenate([empty, *reference]), np.concatenate([empty, *measured])
    entry = compare_to_fp32(ref, probs, targets, unseen=len(probs))
    entry.update(engine="openvino", method=f"cross-fitted: {folds}-fold heads on the training images, "
                 "the model's head on the held-out ones")  # fmt: skip
    return entry


def certify_after_training(fit_head, model, precision: str, train, held_out, *, fine_tuned: bool, seed: int) -> dict:
    """Measure ``precision`` against fp32 as well as this run allows, record it, return the entry."""
    if fine_tuned:
        entry = measure_precisions(model, held_out[2], ["fp32", precision])[precision]
    else:
        entry = cross_fitted_certificate(fit_head, model, precision, train, held_out, seed=seed)
    record_certificate(model, precision, entry)
    return entry

