"""Hardening, round 2 (issue 21 item 12): data problems that passed without a word.

An empty label folder is named in one warning line by ``train`` and ``audit``; a label the
held-out images do not measure says "n/a" (null in JSON), not precision 0.0000; ``report``
says how many images it could not read and lists them on the page.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from imgclf.data.images import load_images_from_directory
from imgclf.inference.metrics import compute_metrics

from .conftest import FLOWERS, small_flower_folder


def photos_with_empty_labels(root):
    """Two labels of real photos, an empty label folder and one holding no image file."""
    folder = small_flower_folder(root, per_class=4, labels=("daisy", "tulips"))
    (folder / "roses").mkdir()
    (folder / "sunflowers").mkdir()
    (folder / "sunflowers" / "README.txt").write_text("photos to come")
    (folder / "sunflowers" / ".DS_Store").write_bytes(b"\0")
    (folder / ".ipynb_checkpoints").mkdir()  # hidden: never a label, never warned about
    return folder


def warning_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: ")]


# ---- an empty label folder ----


def test_loading_names_every_empty_label_folder_in_one_warning(tmp_path):
    folder = photos_with_empty_labels(tmp_path / "photos")
    with pytest.warns(UserWarning) as caught:
        images = load_images_from_directory(folder)
    assert sorted({im.label for im in images}) == ["daisy", "tulips"]
    said = [str(w.message) for w in caught]
    assert len(said) == 1 and "\n" not in said[0], said
    assert "2 empty label folder(s)" in said[0] and "roses, sunflowers" in said[0] and str(folder) in said[0]
    assert ".ipynb_checkpoints" not in said[0]


def test_train_says_an_empty_label_folder_in_one_line(tmp_path, capsys, workspace):
    pytest.importorskip("torch")
    from imgclf.cli import main

    folder = photos_with_empty_labels(tmp_path / "photos")
    code = main(["train", str(folder), "--out", str(tmp_path / "m.imgclf"), "--epochs", "2", "-q",
                 "--workspace", str(workspace)])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    said = [line for line in warning_lines(err) if "empty label folder" in line]
    assert len(said) == 1 and "roses, sunflowers" in said[0], err
    assert "Found 8 images of 2 labels" in out


def test_audit_says_an_empty_label_folder_in_one_line(tmp_path, capsys, workspace):
    pytest.importorskip("imagehash")
    from imgclf.cli import main

    folder = photos_with_empty_labels(tmp_path / "photos")
    code = main(["audit", str(folder), "--json", "--workspace", str(workspace)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["labels"] == {"daisy": 4, "tulips": 4}  # stdout stays one JSON object
    said = warning_lines(err)
    assert len(said) == 1 and "2 empty label folder(s)" in said[0] and "roses, sunflowers" in said[0], err
    assert err.count("UserWarning") == 0


# ---- a label the held-out images do not measure ----

LABELS = ["a", "b", "rare"]
# true a, a, b, b; "rare" has no image and is never predicted
PROBS = np.array([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1]])
TARGETS = [0, 0, 1, 1]


def test_a_label_without_images_is_not_measured_not_zero():
    m = compute_metrics(PROBS, TARGETS, LABELS)
    assert m.per_class["rare"] == {"precision": None, "recall": None, "f1": None, "support": 0}
    assert m.per_class["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    # macro accuracy: the mean recall of the labels that have images, not a 0 for "rare"
    assert m.macro_accuracy == pytest.approx((0.5 + 1.0) / 2)
    d = json.loads(json.dumps(m.to_dict()))
    assert d["per_class"]["rare"] == {"precision": None, "recall": None, "f1": None, "support": 0}
    assert d["labels_not_measured"] == ["rare"]
    text = str(m)
    row = next(line for line in text.splitlines() if line.strip().startswith("rare"))
    assert row.split() == ["rare", "n/a", "n/a", "n/a", "0", "n/a"], row  # log-loss too
    assert "macro accuracy      0.7500  (2 of 3 labels; rare has no images here)" in text


def test_a_label_predicted_but_without_images_has_a_measured_precision():
    probs = PROBS.copy()
    probs[1] = [0.1, 0.1, 0.8]  # an "a" taken for "rare": every "rare" answer is wrong
    m = compute_metrics(probs, TARGETS, LABELS)
    assert m.per_class["rare"] == {"precision": 0.0, "recall": None, "f1": None, "support": 0}
    row = next(line for line in str(m).splitlines() if line.strip().startswith("rare"))
    assert row.split() == ["rare", "0.0000", "n/a", "n/a", "0", "n/a"], row


def test_every_label_measured_keeps_the_table_as_it_was():
    m = compute_metrics(PROBS[:, :2] / PROBS[:, :2].sum(1, keepdims=True), TARGETS, LABELS[:2])
    assert m.to_dict()["labels_not_measured"] == []
    assert all(v is not None and math.isfinite(v) for c in m.per_class.values() for v in c.values())
    assert "macro accuracy      0.7500\n" in str(m)


def test_train_with_a_one_image_label_says_n_a(tmp_path, capsys, workspace):
    pytest.importorskip("torch")
    from imgclf.cli import main

    folder = small_flower_folder(tmp_path / "photos", per_class=5, labels=("daisy", "tulips"))
    (folder / "roses").mkdir()
    shutil.copy(sorted((FLOWERS / "roses").glob("*.jpg"))[0], folder / "roses")
    metrics_file = tmp_path / "metrics.json"
    code = main(["train", str(folder), "--out", str(tmp_path / "m.imgclf"), "--epochs", "2", "-q",
                 "--workspace", str(workspace), "--metrics-json", str(metrics_file)])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.strip().startswith("roses "))
    cells = row.split()
    assert cells[1] in ("n/a", "0.0000") and cells[2:] == ["n/a", "n/a", "0", "n/a"], row
    rare = json.loads(metrics_file.read_text())["per_class"]["roses"]
    assert rare["recall"] is None and rare["f1"] is None and rare["support"] == 0


# ---- report: images it could not read ----


def test_report_says_how_many_images_it_could_not_read_and_lists_them(small_model_file, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from imgclf.cli import main

    folder = small_flower_folder(tmp_path / "holdout", per_class=2)
    (folder / "daisy" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    (folder / "tulips" / "empty.png").write_bytes(b"")
    out = tmp_path / "r"
    assert main(["report", str(small_model_file), str(folder), "--out", str(out)]) == 0
    stdout, err = capsys.readouterr()
    said = warning_lines(err)
    assert len(said) == 1 and "2 unreadable image(s)" in said[0] and "listed on the page" in said[0], err
    assert f"Report: {out / 'index.html'}" in stdout
    html = (out / "index.html").read_text()
    assert "Unreadable images" in html and "broken.jpg" in html and "empty.png" in html
    assert "file is empty (0 bytes)" in html


def test_a_report_that_read_everything_says_nothing(small_model_file, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from imgclf.cli import main

    folder = small_flower_folder(tmp_path / "holdout", per_class=2)
    assert main(["report", str(small_model_file), str(folder), "--out", str(tmp_path / "r")]) == 0
    assert warning_lines(capsys.readouterr().err) == []
    assert "Unreadable images" not in (tmp_path / "r" / "index.html").read_text()
