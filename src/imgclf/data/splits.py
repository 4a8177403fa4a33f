"""Seeded shuffles, stratified train/test splits and k-fold cross-validation."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

from imgclf.data.images import ImageData
from imgclf.errors import DataError, OptionError


def shuffle(images: Sequence[ImageData], seed: int = 1) -> list[ImageData]:
    """A seeded shuffle: the same seed always gives the same order."""
    out = list(images)
    random.Random(seed).shuffle(out)
    return out


def train_test_split(
    images: Sequence[ImageData], test_fraction: float = 0.2, seed: int = 1
) -> tuple[list[ImageData], list[ImageData]]:
    """A stratified, seeded split: each label keeps its share in both parts.

    Every label with at least two images puts at least one in each part.
    """
    if not 0.0 < test_fraction < 1.0:
        raise OptionError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    images = list(images)
    if not all(isinstance(im, ImageData) for im in images):
        wrong = next(i for i, im in enumerate(images) if not isinstance(im, ImageData))
        raise DataError(f"train_test_split: images[{wrong}] is {type(images[wrong]).__name__}; it splits labelled "
                        "ImageData (load_images_from_directory(folder), or ImageData(path, label))")  # fmt: skip
    by_label: dict[str | None, list[ImageData]] = defaultdict(list)
    for im in images:
        by_label[im.label].append(im)
    rng = random.Random(seed)
    train: list[ImageData] = []
    test: list[ImageData] = []
    for label in sorted(by_label, key=lambda x: (x is None, x or "")):
        group = sorted(by_label[label], key=lambda im: im.name)
        rng.shuffle(group)
        n_test = round(len(group) * test_fraction)
        if len(group) >= 2:
            n_test = min(max(n_test, 1), len(group) - 1)
        test.extend(group[:n_test])
        train.extend(group[n_test:])
    return shuffle(train, seed), shuffle(test, seed)


def stratified_folds(
    images: Sequence[ImageData], k: int = 5, seed: int = 1
) -> list[tuple[list[ImageData], list[ImageData]]]:
    """``k`` (train, test) pairs where each image is tested exactly once."""
    if k < 2:
        raise OptionError(f"k must be at least 2, got {k}")
    by_label: dict[str | None, list[ImageData]] = defaultdict(list)
    for im in images:
        by_label[im.label].append(im)
    rng = random.Random(seed)
    folds: list[list[ImageData]] = [[] for _ in range(k)]
    for label in sorted(by_label, key=lambda x: (x is None, x or "")):
        group = sorted(by_label[label], key=lambda im: im.name)
        rng.shuffle(group)
        for i, im in enumerate(group):
            folds[i % k].append(im)
    return [([im for j, f in enumerate(folds) if j != i for im in f], list(folds[i])) for i in range(k)]
