"""Shared fixtures: real images from the bundled sets, a small trained model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from imgclf.sample_data import sample_data_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the network

FLOWERS = sample_data_dir("flowers")
PREDICT = sample_data_dir("predict")
SANITY = Path(__file__).parent / "data" / "imagenet-sanity"


def small_flower_folder(dest: Path, per_class: int = 6, labels=("daisy", "dandelion", "tulips")) -> Path:
    """A copy of a few real flower photos per label, to train on quickly."""
    for label in labels:
        (dest / label).mkdir(parents=True, exist_ok=True)
        for f in sorted((FLOWERS / label).glob("*.jpg"))[:per_class]:
            shutil.copy(f, dest / label / f.name)
    return dest


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("workspace")


@pytest.fixture(scope="session")
def small_model(tmp_path_factory, workspace):
    """A model trained on 3 labels x 6 real photos (quick, real backbone)."""
    from imgclf import ImageClassificationTrainer, load_images_from_directory

    folder = small_flower_folder(tmp_path_factory.mktemp("small"))
    images = load_images_from_directory(folder)
    return ImageClassificationTrainer(epochs=15, workspace=workspace, progress=False).fit(images)
