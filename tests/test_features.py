"""The workspace cache: reused on a second run, invalidated when an image changes."""

import shutil

import numpy as np
import pytest

pytest.importorskip("torch")

from imgclf import ImageClassificationTrainer, load_images_from_directory  # noqa: E402

from .conftest import FLOWERS, small_flower_folder  # noqa: E402


def counts(model):
    return model.info["extraction"]["extracted"], model.info["extraction"]["cached"]


def test_cache_reuse_and_invalidation(tmp_path):
    folder = small_flower_folder(tmp_path / "data", per_class=3, labels=("daisy", "roses"))
    ws = tmp_path / "ws"
    trainer = ImageClassificationTrainer(epochs=3, workspace=ws, progress=False)

    first = trainer.fit(load_images_from_directory(folder))
    assert counts(first) == (6, 0)

    second = trainer.fit(load_images_from_directory(folder))
    assert counts(second) == (0, 6)
    # same data and seed: the same model
    for a, b in zip(first.head.state_dict().values(), second.head.state_dict().values()):
        assert np.array_equal(a.numpy(), b.numpy())

    victim = sorted((folder / "roses").glob("*.jpg"))[0]
    shutil.copy(sorted((FLOWERS / "roses").glob("*.jpg"))[10], victim)  # same name, new content
    third = trainer.fit(load_images_from_directory(folder))
    assert counts(third) == (1, 5)


def test_no_cache_writes_nothing(tmp_path):
    folder = small_flower_folder(tmp_path / "data", per_class=2, labels=("daisy", "roses"))
    ws = tmp_path / "ws"
    model = ImageClassificationTrainer(epochs=1, workspace=ws, use_cache=False, progress=False).fit(
        load_images_from_directory(folder)
    )
    assert not (ws / "features").exists()
    assert list(ws.glob("checkpoints/*")) == [model.checkpoint_path_]  # kept until the model is safe on disk
    model.save(tmp_path / "m.imgclf")
    assert not list(ws.glob("checkpoints/*")) and model.checkpoint_path_ is None
