"""Shared fixtures: real images from the bundled sets, a small trained model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from imgclf.sample_data import sample_data_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the network
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2` on 2 cores: a thread each, not two threads each
    os.environ.setdefault("OMP_NUM_THREADS", "1")

def ctrl_c_as_in_a_terminal() -> None:
    """``preexec_fn`` of a child that a test stops with SIGINT: the default disposition, as in a
    terminal. A test command started in the background by a non-interactive shell (``cmd &``)
    inherits SIGINT ignored, and the child would never see the Ctrl-C the test sends."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


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


@pytest.fixture(scope="session")
def small_model_file(small_model, tmp_path_factory) -> Path:
    """``small_model`` saved once for the session: for tests that only read a model file (about 20
    did their own ``small_model.save()``). Never write to it; a test that changes a file saves its own."""
    return small_model.save(tmp_path_factory.mktemp("model-file") / "small.imgclf")


@pytest.fixture(scope="session")
def small_multilabel_model(tmp_path_factory, workspace):
    """(model, its ONNX export, held-out images): a multi-label model trained on 30 side-by-side
    mosaics (448x224) of two real photos of 3 labels, and 3 held-out mosaics of other photos.
    For the paths that must carry sets (Spark, Node); tests/test_multilabel.py has its own, larger."""
    from imgclf import ImageClassificationTrainer
    from imgclf.data.layouts import load_dataset
    from imgclf.testing import write_mosaics

    dest = tmp_path_factory.mktemp("small-multilabel")
    files = {label: sorted((FLOWERS / label).glob("*.jpg")) for label in ("daisy", "dandelion", "tulips")}
    rows = write_mosaics(dest, {k: v[:12] for k, v in files.items()}, 30, 1, "train")
    held_out = write_mosaics(dest, {k: v[12:16] for k, v in files.items()}, 3, 2, "test")
    (dest / "m.csv").write_text("path,label\n" + "".join(f"{f},{lbl}\n" for f, lbl in rows))
    model = ImageClassificationTrainer(epochs=30, workspace=workspace, progress=False).fit(
        load_dataset(dest / "m.csv").train)  # fmt: skip
    return model, model.export_onnx(dest / "multi.onnx"), [dest / name for name, _ in held_out]


@pytest.fixture(scope="session")
def small_onnx_model(small_model, tmp_path_factory) -> Path:
    """``small_model`` exported to ONNX once for the session: the fast, torch-free model of the
    batch-scoring, serving and Node tests. Never write to it."""
    path = tmp_path_factory.mktemp("onnx") / "small.onnx"
    small_model.export_onnx(path)
    return path


def scoring_folder(dest: Path) -> Path:
    """Real photos at two depths (JPEG and PNG) plus three that cannot be scored."""
    nested = dest / "nested" / "deeper"
    nested.mkdir(parents=True)
    for f in sorted(PREDICT.glob("*g")):
        shutil.copy(f, dest / f.name)
    for label in ("daisy", "tulips"):
        for f in sorted((FLOWERS / label).glob("*.jpg"))[:2]:
            shutil.copy(f, nested / f.name)
    (dest / "truncated.jpg").write_bytes((PREDICT / "classic-daisy.jpg").read_bytes()[:2500])
    (nested / "notes.jpg").write_text("not a picture")
    (dest / "empty.png").write_bytes(b"")
    return dest


CORRUPT = {"truncated.jpg", "notes.jpg", "empty.png"}


def predict_json(model: Path, *inputs, top_k: int = 2) -> dict[str, dict]:
    """What plain ``imgclf predict --json`` says for each file, by path."""
    import contextlib
    import io
    import json

    from imgclf.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        main(["predict", str(model), *map(str, inputs), "--json", "--top-k", str(top_k)])
    return {r["file"]: r for r in json.loads(out.getvalue())}


def assert_agrees_with_predict_json(rows: list[dict], expected: dict[str, dict]) -> None:
    """Same files, same labels, probabilities within 1e-5, the same ``known`` (its score within
    1e-5), error rows where predict has errors."""
    assert sorted(r["path"] for r in rows) == sorted(expected)
    for row in rows:
        want = expected[row["path"]]
        if want.get("error"):
            assert row["error"] and row["label"] is None and row["probability"] is None, row
        else:
            assert row["error"] is None, row
            assert row["label"] == want["label"], row
            assert abs(row["probability"] - want["probability"]) < 1e-5, row
            assert row["known"] is want["known"] and abs(row["unknown_score"] - want["unknown_score"]) < 1e-5, row
