"""The training report: charts from the model file alone, and per-image results on a labelled folder."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

from imgclf import load_images_from_directory, write_report  # noqa: E402
from imgclf.cli import main  # noqa: E402
from imgclf.insight.report import calibration, most_confused  # noqa: E402

from .conftest import FLOWERS, small_flower_folder  # noqa: E402


def png_size(path):
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def test_report_from_the_model_file_alone_draws_its_history(small_model_file, tmp_path, capsys):
    model = small_model_file
    assert main(["report", str(model), "--out", str(tmp_path / "r")]) == 0
    assert "r/index.html" in capsys.readouterr().out
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert len(data["history"]) == 15 and data["charts"] == {"curves": "curves.png"}
    width, height = png_size(tmp_path / "r" / "curves.png")
    assert width > 600 and height > 250
    html = (tmp_path / "r" / "index.html").read_text()
    assert "curves.png" in html and "give labelled images" in html


def test_report_on_a_folder_adds_calibration_and_top_losses(small_model, tmp_path):
    folder = small_flower_folder(tmp_path / "holdout", per_class=8)
    (folder / "daisy" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    page = write_report(small_model, load_images_from_directory(folder), tmp_path / "r", name="flowers")
    data = json.loads((page.parent / "report.json").read_text())
    assert set(data["charts"]) == {"curves", "confusion", "calibration", "top_losses"}
    for chart in data["charts"].values():
        png_size(page.parent / chart)
    metrics = data["metrics"]
    assert metrics["count"] == 24 and np.array(metrics["confusion_matrix"]).sum() == 24
    assert data["skipped"][0]["file"].endswith("broken.jpg")
    losses = [t["loss"] for t in data["top_losses"]]
    assert losses == sorted(losses, reverse=True) and len(losses) == 16
    worst = data["top_losses"][0]
    assert worst["loss"] == pytest.approx(-np.log(worst["true_probability"]))
    bins = data["calibration"]["bins"]
    assert sum(b["count"] for b in bins) == 24
    ece = sum(b["count"] / 24 * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])
    assert data["calibration"]["expected_calibration_error"] == pytest.approx(ece)
    html = page.read_text()
    assert html.count('<img src="thumbs/') == 16 and "calibration.png" in html and "http" not in html


def test_report_takes_what_evaluate_takes(small_model, tmp_path):
    """A folder, a list of paths or a DataFrame (as evaluate takes them) were an AttributeError
    ('str' object has no attribute 'source') or pandas' ambiguous truth value."""
    import pandas as pd

    folder = small_flower_folder(tmp_path / "holdout", per_class=3)
    paths = sorted(str(p) for p in folder.glob("*/*.jpg"))
    frame = pd.DataFrame({"path": paths, "label": [p.split("/")[-2] for p in paths]})
    expected = small_model.evaluate(folder).to_dict()["confusion_matrix"]
    for n, images in enumerate((folder, paths, frame)):
        page = write_report(small_model, images, tmp_path / f"r{n}")
        assert json.loads((page.parent / "report.json").read_text())["metrics"]["confusion_matrix"] == expected


def test_a_report_written_again_in_its_folder_leaves_nothing_of_the_last_one(small_model, tmp_path):
    """The model-file-alone report written where one with images was left the last one's
    calibration and top-loss charts and thumbnails beside a page that no longer shows them."""
    import re

    folder = small_flower_folder(tmp_path / "holdout", per_class=2)
    out = tmp_path / "r"
    for images in (folder, folder, None):
        page = write_report(small_model, images, out)
        shown = set(re.findall(r"""src=["']([^"']+)["']""", page.read_text()))
        assert all((out / src).is_file() for src in shown)  # a page written again keeps what it shows
    left = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert left == {"index.html", "report.json"} | shown, left - shown


def test_calibration_of_known_probabilities():
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.65, 0.35], [0.35, 0.65]])
    targets = np.array([0, 1, 0, 0])  # 0.95 bin: 1 of 2 right; 0.65 bin: 1 of 2 right
    result = calibration(probs, targets)
    assert result["expected_calibration_error"] == pytest.approx(0.5 * 0.45 + 0.5 * 0.15)
    counts = {round(b["low"], 1): b["count"] for b in result["bins"] if b["count"]}
    assert counts == {0.6: 2, 0.9: 2}


def test_most_confused_pairs_come_first():
    matrix = [[5, 2, 0], [0, 4, 3], [1, 0, 6]]
    assert most_confused(matrix, ["a", "b", "c"], top=2) == [
        {"true": "b", "predicted": "c", "images": 3}, {"true": "a", "predicted": "b", "images": 2}]  # fmt: skip


@pytest.mark.slow
def test_train_writes_the_report_and_warns_about_a_copy_under_two_labels(tmp_path, capsys, workspace):
    folder = small_flower_folder(tmp_path / "data", per_class=5, labels=("daisy", "tulips"))
    first_daisy = sorted((FLOWERS / "daisy").glob("*.jpg"))[0]
    shutil.copy(first_daisy, folder / "tulips" / "not-a-tulip.jpg")
    code = main(["train", str(folder), "--out", str(tmp_path / "m.imgclf"), "--epochs", "5", "--workspace",
                 str(workspace), "--report", str(tmp_path / "report"), "-q"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert warnings == ["warning: the training folder has 1 group(s) of copies filed under different labels; "
                        "`imgclf audit FOLDER` shows them"]  # fmt: skip
    assert f"Report: {tmp_path / 'report' / 'index.html'}" in out
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert data["metrics"]["count"] == 2 and len(data["history"]) == 5  # held out: one image of each label
    assert set(data["charts"]) == {"curves", "confusion", "calibration", "top_losses"}


def test_report_refuses_a_file_as_its_folder(small_model_file, tmp_path, capsys):
    model = small_model_file
    (tmp_path / "taken").write_text("not a folder")
    assert main(["report", str(model), "--out", str(tmp_path / "taken")]) == 2
    assert "taken: exists and is not a folder" in capsys.readouterr().err


def test_report_and_audit_never_overwrite_a_users_files(small_model_file, tmp_path, capsys, workspace):
    """A hostile pass: `report --out u` replaced the user's own u/index.html without a word, and
    `audit fl --out fl/aud` wrote its thumbnails where the next train read them as a label."""
    mine = tmp_path / "u"
    mine.mkdir()
    (mine / "index.html").write_text("my own page")
    for argv in (["report", str(small_model_file), "--out", str(mine)], ["audit", str(FLOWERS), "--out", str(mine)]):
        assert main(argv) == 2
        assert "holds files that are not an imgclf page" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["index.html"] and (mine / "index.html").read_text() == "my own page"
    folder = small_flower_folder(tmp_path / "fl", per_class=2)
    before = sorted(p.name for p in folder.rglob("*"))
    assert main(["audit", str(folder), "--out", str(folder / "aud"), "--workspace", str(workspace)]) == 2
    assert "is inside the image folder" in capsys.readouterr().err
    assert sorted(p.name for p in folder.rglob("*")) == before
    (tmp_path / "f").write_text("x")
    assert main(["audit", str(folder), "--out", str(tmp_path / "f")]) == 2  # was a FileExistsError traceback
    assert "f: exists and is not a folder" in capsys.readouterr().err
    again = tmp_path / "again"  # an earlier report's folder is rewritten
    assert main(["report", str(small_model_file), "--out", str(again)]) == 0
    assert main(["report", str(small_model_file), "--out", str(again)]) == 0
    capsys.readouterr()
    held = small_flower_folder(tmp_path / "held", per_class=2)  # the network runs: the console says on what
    assert main(["report", str(small_model_file), str(held), "--out", str(tmp_path / "r2")]) == 0
    ran = json.loads((tmp_path / "r2" / "report.json").read_text())["ran"]
    assert f"imgclf: engine {ran['engine']}, {ran['precision']} (" in capsys.readouterr().err
