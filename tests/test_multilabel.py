"""Multi-label: a manifest whose label cells hold sets of labels trains a sigmoid model that
answers sets, and every path that carries a prediction (Python, --json, the terminal, results
files, HTTP, ONNX) carries the set; the paths not done yet refuse it in one line.

The images are real: side-by-side mosaics of two bundled flower photos of different labels,
labelled with both. One model, trained once for the module, serves every test.
"""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from imgclf.data.images import ImageData
from imgclf.data.layouts import load_dataset
from imgclf.errors import ModelFileError, OptionError
from imgclf.inference.multilabel import (
    MultilabelMetrics,
    average_precision,
    choose_thresholds,
    compute_multilabel_metrics,
)
from imgclf.testing import write_mosaics

from .conftest import FLOWERS

LABELS = ("daisy", "dandelion", "roses", "tulips")
TILE = 112


def mosaics(dest: Path, photos: dict[str, list[Path]], count: int, seed: int, prefix: str) -> list[tuple[str, str]]:
    """``count`` side-by-side mosaics of two photos of different labels (112-pixel tiles); (file, "a;b") rows."""
    return write_mosaics(dest, photos, count, seed, prefix, tile=TILE)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """60 training and 24 held-out mosaics (no photo in both), listed with a split column."""
    dest = tmp_path_factory.mktemp("mosaics")
    files = {label: sorted((FLOWERS / label).glob("*.jpg")) for label in LABELS}
    rows = [(*r, "train") for r in mosaics(dest, {k: v[:20] for k, v in files.items()}, 60, 1, "train")]
    rows += [(*r, "test") for r in mosaics(dest, {k: v[20:26] for k, v in files.items()}, 24, 2, "test")]
    path = dest / "mosaics.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "split"), *rows])
    return path


@pytest.fixture(scope="module")
def trained(manifest, workspace):
    """(model, held-out images) trained once on the mosaics."""
    from imgclf import ImageClassificationTrainer

    dataset = load_dataset(manifest)
    trainer = ImageClassificationTrainer(epochs=30, workspace=workspace, progress=False)
    return trainer.fit_and_hold_out(dataset.train, test_set=dataset.test)


@pytest.fixture(scope="module")
def model_file(trained, tmp_path_factory) -> Path:
    return trained[0].save(tmp_path_factory.mktemp("ml-model") / "multi.imgclf")


# --- reading: a cell with several labels makes the dataset multi-label; one label stays as it was ---


def test_manifest_cells_with_several_labels_are_sets(tmp_path):
    photo = sorted((FLOWERS / "daisy").glob("*.jpg"))[0]
    (tmp_path / "a.csv").write_text(f"path,label\n{photo},daisy;tulips\n{photo.with_name('x.jpg')},roses\n")
    first, second = load_dataset(tmp_path / "a.csv").train
    assert (first.labels, first.label) == (("daisy", "tulips"), "daisy;tulips")
    assert second.labels == ("roses",)  # a set of one, in a multi-label manifest
    lines = [{"path": str(photo), "label": ["roses", "daisy"]}, {"path": "y.jpg", "label": []}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    found = {Path(im.name).name: im.labels for im in load_dataset(tmp_path / "b.jsonl").train}
    assert found == {photo.name: ("roses", "daisy"), "y.jpg": ()}  # an empty list: none of the labels
    (tmp_path / "c.csv").write_text(f"path,label\n{photo},daisy\n")
    (single,) = load_dataset(tmp_path / "c.csv").train
    assert single == ImageData(photo, "daisy", str(photo)) and single.labels is None  # exactly as before


def test_parquet_list_cells_are_sets(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    photo = str(sorted((FLOWERS / "daisy").glob("*.jpg"))[0])
    pq.write_table(pa.table({"path": [photo], "label": [["daisy", "roses"]]}), tmp_path / "m.parquet")
    assert load_dataset(tmp_path / "m.parquet").train[0].labels == ("daisy", "roses")


# --- metrics and thresholds (numpy) ---


def test_average_precision_and_metrics_by_hand():
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0])) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision(np.array([0.5, 0.5]), np.array([0, 0])) is None
    probs = np.array([[0.9, 0.2], [0.6, 0.7], [0.1, 0.8]])
    y = np.array([[1, 0], [0, 1], [0, 1]])
    m = compute_multilabel_metrics(probs, y, ["a", "b"], [0.5, 0.5])
    assert m.per_label["a"]["precision"] == 0.5 and m.per_label["a"]["recall"] == 1.0
    assert m.hamming_loss == pytest.approx(1 / 6) and m.micro_f1 == pytest.approx(2 * 3 / (2 * 3 + 1))
    assert m.mean_average_precision == pytest.approx(1.0) and m.subset_accuracy == pytest.approx(2 / 3)
    assert choose_thresholds(probs, y) == [0.65, 0.5]  # a: the best F1 nearest 0.5; b: 0.5 already separates


# --- the trained model ---


def test_training_gives_a_multilabel_model_that_answers_sets(trained):
    model, held_out = trained
    assert model.multilabel and len(model.thresholds) == 4 and model.labels == list(LABELS)
    assert model.preprocessing.frame == "whole" and len(held_out) == 24
    assert "out-of-fold" in model.info["training"]["thresholds_chosen_on"]
    prediction = model.predict(held_out[0])
    assert prediction.labels is not None and all(p >= model.thresholds[model.labels.index(lbl)]
                                                 for lbl, p in prediction.labels)  # fmt: skip
    said = prediction.to_dict(file="x.jpg")
    assert said["labels"] == [{"label": lbl, "probability": p} for lbl, p in prediction.labels]
    assert sum(prediction.scores.values()) != pytest.approx(1.0)  # a sigmoid per label, not a softmax


def test_held_out_metrics_fit_multilabel_and_are_good(trained):
    model, held_out = trained
    m = model.evaluate_held_out(held_out)
    assert isinstance(m, MultilabelMetrics) and m.count == 24
    assert m.mean_average_precision >= 0.8 and m.micro_f1 >= 0.6  # 60 small mosaics; the benchmark has the real figure
    again = model.evaluate(held_out)  # through the network: the same numbers as from the kept features
    assert again.mean_average_precision == pytest.approx(m.mean_average_precision, abs=1e-4)
    said = m.to_dict()
    assert said["multilabel"] and {"micro_f1", "macro_f1", "hamming_loss", "per_label"} <= set(said)
    assert "mean average precision" in str(m)


def test_model_file_is_format_2_and_round_trips(trained, model_file):
    from imgclf import load_model
    from imgclf.inference.model import read_model_config

    config = read_model_config(model_file)
    assert config["format_version"] == 2 and config["multilabel"]["thresholds"] == trained[0].thresholds
    assert config["preprocessing"]["frame"] == "whole"
    loaded = load_model(model_file)
    image = trained[1][0]
    assert loaded.thresholds == trained[0].thresholds
    a, b = loaded.predict(image).labels, trained[0].predict(image).labels
    assert [lbl for lbl, _ in a] == [lbl for lbl, _ in b]
    assert [p for _, p in a] == pytest.approx([p for _, p in b], abs=1e-5)


def test_an_older_imgclf_refuses_it_in_one_line(model_file, monkeypatch):
    """An imgclf that reads format 1 alone (a Spark executor, a Ray actor not yet upgraded)."""
    from imgclf.inference import metadata
    from imgclf.inference.model import read_model_config

    monkeypatch.setattr(metadata, "FORMAT_VERSION", 1)
    with pytest.raises(ModelFileError, match=r"made by a newer imgclf \(format 2\); upgrade imgclf$"):
        read_model_config(model_file)


def test_a_single_label_model_stays_format_1(trained):
    model = trained[0]
    thresholds, model.thresholds = model.thresholds, None
    try:
        config = model.config()
    finally:
        model.thresholds = thresholds
    assert config["format_version"] == 1 and "multilabel" not in config


def test_multilabel_metadata_is_checked(trained, tmp_path):
    from imgclf.inference.metadata import parse_metadata

    config = json.loads(json.dumps(trained[0].config()))
    parse_metadata(json.dumps(config), "m", "imgclf")
    for change, message in (({"format_version": 1}, "multi-label model is format 2"),
                            ({"multilabel": {"thresholds": [0.5, 0.5]}}, "2 values for 4 labels"),
                            ({"multilabel": {"thresholds": [0.5, 0.5, 0.5, 1.5]}}, "less than or equal to 1"),
                            ({"preprocessing": {**config["preprocessing"], "frame": "crop"}},
                             "input_shape applies to the whole frame alone"),
                            ({"preprocessing": {**config["preprocessing"], "input_shape": [224, 100000]}},
                             "less than or equal to")):  # fmt: skip
        with pytest.raises(ModelFileError, match=message):
            parse_metadata(json.dumps({**config, **change}), "m", "imgclf")


# --- images wider than 3:2 keep their aspect, in every path ---


def test_the_whole_frame_takes_the_images_aspect_from_3_to_2_on():
    from imgclf.data.imaging import input_shape_for

    assert input_shape_for(4 / 3, 224) is None and input_shape_for(3 / 4, 224) is None  # photos: the square
    assert input_shape_for(1.5, 224) == (224, 352) and input_shape_for(2.0, 224) == (224, 448)
    assert input_shape_for(1 / 2.0, 224) == (448, 224)  # tall: height first
    assert input_shape_for(5.0, 224) == (224, 448)  # at most twice the short side
    assert input_shape_for(1.8, 260) == (260, 480)  # steps of 32 pixels
    assert input_shape_for(float("nan"), 224) is None


def test_a_2_to_1_set_trains_a_448x224_network_that_every_path_runs(trained, model_file, tmp_path, caplog, capsys):
    """The mosaics are 2:1 (224x112): squeezed into the square, each photo lost half its width
    (docs/benchmarks.md: the rectangle gains 3.5 points of mean average precision)."""
    pytest.importorskip("onnxruntime")
    import logging

    import onnx

    from imgclf.cli import main
    from imgclf.inference.model import load_model
    from imgclf.training.multilabel import _with_their_aspect

    model, held_out = trained
    assert model.preprocessing.input_shape == (224, 448) and model.preprocessing.frame == "whole"
    assert load_model(model_file).preprocessing == model.preprocessing  # kept in the model file
    with caplog.at_level(logging.INFO, logger="imgclf"):
        _with_their_aspect(replace(model.preprocessing, input_shape=None), held_out, seed=1)
    (said,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("frame whole")]
    assert said == ("frame whole: the images resized whole to 448x224 (width x height), their aspect (the median "
                    f"width / height of {len(held_out)} training images is 2.00)")  # fmt: skip
    path = model.export_onnx(tmp_path / "wide.onnx")
    dims = [d.dim_value or d.dim_param for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [3, 224, 448]
    explained = model.explain(held_out[0])
    assert explained.cells.shape == (7, 14) and explained.map.shape == (112, 224)  # the image's own size
    assert main(["predict", str(path), str(held_out[0].source), "--json"]) in (0, None)
    (row,) = json.loads(capsys.readouterr().out)
    assert row["labels"] == [{"label": lbl, "probability": pytest.approx(p, abs=1e-4)}
                             for lbl, p in model.predict(held_out[0]).labels]  # fmt: skip


# --- every output carries the set ---


def test_predict_json_and_terminal_carry_the_set(model_file, trained, capsys):
    from imgclf.cli import main

    image = trained[1][0]
    assert main(["predict", str(model_file), str(image.source), "--json"]) in (0, None)
    (said,) = json.loads(capsys.readouterr().out)
    expected = trained[0].predict(image).labels
    assert [x["label"] for x in said["labels"]] == [lbl for lbl, _ in expected]
    main(["predict", str(model_file), str(image.source)])
    line = capsys.readouterr().out.strip().split("\t")
    assert line[1] == ";".join(lbl for lbl, _ in expected)


def test_evaluate_json_gives_multilabel_metrics(model_file, manifest, capsys):
    from imgclf.cli import main

    main(["evaluate", str(model_file), str(manifest), "--json"])
    said = json.loads(capsys.readouterr().out)
    assert said["count"] == 24 and said["mean_average_precision"] >= 0.8 and "hamming_loss" in said


def test_onnx_export_is_a_sigmoid_with_thresholds(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    from imgclf.inference.runtime import load_onnx_model

    model, held_out = trained
    path = model.export_onnx(tmp_path / "multi.onnx")
    onnx_model = load_onnx_model(path)
    assert onnx_model.thresholds == pytest.approx(model.thresholds) and onnx_model.info["format_version"] == 2
    for image in held_out[:3]:
        a, b = model.predict(image), onnx_model.predict(image)
        assert [lbl for lbl, _ in a.labels] == [lbl for lbl, _ in b.labels]
        assert list(a.scores.values()) == pytest.approx(list(b.scores.values()), abs=1e-4)


def test_batch_scoring_writes_the_set(model_file, trained, tmp_path):
    from imgclf.batch.local import score_to_folder

    images = [str(im.source) for im in trained[1][:4]]
    score_to_folder(model_file, images, tmp_path / "out.jsonl", progress=False)
    written = [json.loads(line) for f in sorted((tmp_path / "out.jsonl").glob("*.jsonl"))
               for line in f.read_text().splitlines()]  # fmt: skip
    model = trained[0]
    by_path = {r["path"]: r for r in written}
    for path in images:
        assert by_path[path]["labels"] == [lbl for lbl, _ in model.predict(path).labels]


def test_http_api_carries_the_set(model_file, trained):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from imgclf.serve import create_app

    image = trained[1][0]
    with TestClient(create_app(model_file)) as client:
        r = client.post("/v1/predict", content=image.read_bytes(), headers={"content-type": "image/jpeg"})
        assert client.get("/v1/model").json()["input_shape"] == [224, 448]  # the mosaics' 2:1, not the square
    assert r.status_code == 200 and r.json()["row_version"] == 4
    assert [x["label"] for x in r.json()["results"][0]["labels"]] == [
        lbl for lbl, _ in trained[0].predict(image).labels
    ]


# --- what is not done yet refuses a multi-label model in one line ---


def test_rows_carry_known_and_reject_unknown_is_one_line(trained, model_file, manifest, tmp_path, capsys):
    """A multi-label model had no unknown-input detector: `known` was null in every path. It has the
    single-label models' (fitted on the same features), a texture it never saw is not known, and
    --reject-unknown, which would need an answer in place of a set, is one line."""
    from PIL import Image

    from imgclf.cli import main
    from imgclf.inference.runtime import load_onnx_model

    model, held_out = trained
    assert model.unknown_ is not None and model.unknown_.measured["held_out_images"] == len(held_out)
    # (not a share to hold it to: these mosaics reuse each training photo about 1.5 times, which
    # makes the cross-fitted threshold tight; docs/known.md measures it)
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 448), dtype=np.uint8), "L").save(noise)
    onnx_model = load_onnx_model(model.export_onnx(tmp_path / "multi.onnx"))
    for image, known in ((held_out[0].source, None), (noise, False)):
        said = model.predict(image)
        assert said.known is not None and said.known == (said.known if known is None else known)
        assert onnx_model.predict(image).known == said.known  # the exported graph scores it too
        assert main(["predict", str(model_file), str(image), "--json"]) in (0, None)
        (row,) = json.loads(capsys.readouterr().out)
        assert row["known"] == said.known and row["unknown_score"] == pytest.approx(said.unknown_score, abs=1e-5)
    image = str(next(iter(load_dataset(manifest).train)).source)
    for argv in (["predict", str(model_file), image, "--reject-unknown"],
                 ["evaluate", str(model_file), str(manifest), "--reject-unknown"]):  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert "trained before imgclf had one" not in "\n".join(err)
        assert err[-1].startswith("imgclf: error: --reject-unknown: ") and "multi-label" in err[-1], err


def test_the_report_shows_what_fits_sets_of_labels(trained, model_file, manifest, tmp_path, capsys):
    """The report of a multi-label model: evaluate's metrics, a precision-recall curve per label,
    the calibration of every image-label probability, and the worst sets worst first, with
    what was missed and what was said wrongly; from the CLI, on the manifest's test part."""
    from imgclf.cli import main
    from imgclf.insight.label_sets import label_calibration

    model, held_out = trained
    out = tmp_path / "report"
    assert main(["report", str(model_file), str(manifest), "--out", str(out)]) == 0, capsys.readouterr().err
    assert "measuring on" in capsys.readouterr().err  # the manifest's test part
    data = json.loads((out / "report.json").read_text())
    expected = model.evaluate(held_out).to_dict()
    assert data["multilabel"] and data["metrics"]["count"] == 24
    for key in ("mean_average_precision", "micro_f1", "macro_f1", "hamming_loss", "subset_accuracy"):
        assert data["metrics"][key] == pytest.approx(expected[key], abs=1e-6), key
    assert {"curves", "precision_recall", "calibration", "top_losses"} <= set(data["charts"])
    assert all((out / name).stat().st_size > 5000 for name in data["charts"].values())
    losses = [t["loss"] for t in data["top_losses"]]
    assert len(losses) == 16 and losses == sorted(losses, reverse=True)
    predictions = dict(zip((im.name for im in held_out), model.predict_batch(held_out)))
    for t in data["top_losses"]:
        image = next(im for im in held_out if im.name == t["file"])
        said = {lbl for lbl, _ in predictions[t["file"]].labels}
        assert set(t["true"]) == set(image.labels) and set(t["predicted"]) == said
        assert set(t["missed"]) == set(t["true"]) - said and set(t["extra"]) == said - set(t["true"])
    probs = np.array([[predictions[im.name].scores[lbl] for lbl in model.labels] for im in held_out])
    targets = np.array([[lbl in im.labels for lbl in model.labels] for im in held_out], float)
    worst = (-np.where(targets > 0, np.log(probs), np.log1p(-probs))).sum(1).max()
    assert losses[0] == pytest.approx(worst, rel=1e-4)
    calibration = label_calibration(probs, targets)
    assert sum(b["count"] for b in calibration["bins"]) == 24 * 4  # every image-label probability, once
    assert data["calibration"]["expected_calibration_error"] == pytest.approx(
        calibration["expected_calibration_error"], abs=1e-5)  # fmt: skip
    html = (out / "index.html").read_text()
    assert "mean average precision" in html and "multi-label" in html and "missed" in html
    assert "precision_recall.png" in html and "confusion" not in html

    from imgclf import load_model
    from imgclf.insight.report import write_report

    saved = load_model(model_file)  # the model file alone: the held-out metrics train saves in it
    saved.info["metrics"] = expected
    alone = json.loads((write_report(saved, None, tmp_path / "alone").parent / "report.json").read_text())
    assert alone["metrics"]["mean_average_precision"] == expected["mean_average_precision"]
    assert list(alone["charts"]) == ["curves"] and "held-out images of training" in alone["metrics_from"]


def test_a_multilabel_run_is_logged_to_mlflow_and_tensorboard(manifest, workspace, tmp_path, monkeypatch, capsys):
    """``imgclf train MANIFEST --mlflow --tensorboard DIR`` on sets of labels: the run holds the
    options, the head's epochs and the held-out multi-label metrics; its pyfunc model answers the
    sets ``predict`` answers; TensorBoard shows the metrics and the images whose sets were wrong
    (a local SQLite store: no server)."""
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    import pandas as pd
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from imgclf import load_model
    from imgclf.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # the artifacts beside the store
    out, board = tmp_path / "m.imgclf", tmp_path / "board"
    argv = ["train", str(manifest), "--epochs", "12", "--workspace", str(workspace), "--out", str(out), "-q",
            "--mlflow", "--mlflow-experiment", "sets", "--tensorboard", str(board)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert "warning:" not in capsys.readouterr().err
    model = load_model(out)
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("sets").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["epochs"] == "12"
    assert len(client.get_metric_history(run.info.run_id, "head/train_loss")) == 12
    for key in ("mean_average_precision", "micro_f1", "hamming_loss"):
        assert run.data.metrics[f"test_{key}"] == pytest.approx(model.info["metrics"][key]), key
    held_out = load_dataset(manifest).test
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    answers = pyfunc.predict(pd.DataFrame({"path": [im.name for im in held_out[:4]]}))
    for im, row in zip(held_out[:4], answers.itertuples()):
        assert [lbl for lbl, _ in model.predict(im).labels] == list(row.labels), im.name

    events = EventAccumulator(str(board), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("head/train_loss")] == list(range(1, 13))
    assert "test/mean_average_precision" in events.Tags()["scalars"]
    assert "test/confusion_matrix" not in events.Tags()["images"]  # a confusion matrix does not fit sets
    wrong = [im for im in held_out if {lbl for lbl, _ in model.predict(im).labels} != set(im.labels)]
    shown = [t for t in events.Tags()["images"] if t.startswith("misclassified/")]
    assert 0 < len(shown) <= len(wrong)


def test_a_manifest_of_test_rows_alone_is_evaluated_and_sets_on_a_single_label_model_are_one_line(
    model_file, manifest, small_model_file, tmp_path, capsys
):
    """A manifest whose split column holds test rows alone is measured on them (it was refused as
    having no train rows); a single-label model given sets of labels says so in one line (it
    listed every 'a;b' as a label it does not know)."""
    from imgclf.cli import main

    rows = [r for r in csv.reader(open(manifest))]
    only_test = tmp_path / "test-only.csv"
    with open(only_test, "w", newline="") as f:
        csv.writer(f).writerows([rows[0], *[(str(manifest.parent / r[0]), *r[1:]) for r in rows[1:] if r[2] == "test"]])
    capsys.readouterr()
    assert main(["evaluate", str(model_file), str(only_test), "--json"]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["count"] == 24
    for argv in (["evaluate", str(small_model_file), str(only_test)],
                 ["report", str(small_model_file), str(only_test), "--out", str(tmp_path / "r")]):  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == ("imgclf: error: these images have sets of labels (a manifest cell like 'a;b') and the "
                           "model is single-label: evaluate a multi-label model on them, or give each image one "
                           "label"), err  # fmt: skip
    assert main(["train", str(only_test), "--workspace", str(tmp_path / "ws")]) == 2  # training still needs train rows
    assert "no row has 'split' train" in capsys.readouterr().err


def test_a_report_on_labels_the_model_does_not_know_is_one_line_and_leaves_no_folder(model_file, manifest, tmp_path,
                                                                                   capsys):  # fmt: skip
    """The refused report left an empty folder behind (the folders it made are removed; one that
    was there is kept, with what it held)."""
    from imgclf.cli import main

    photo = manifest.parent / next(r[0] for r in csv.reader(open(manifest)) if r[2] == "test")
    bad = tmp_path / "bad.csv"
    bad.write_text(f"path,label\n{photo},daisy;orchid\n")
    assert main(["report", str(model_file), str(bad), "--out", str(tmp_path / "new" / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "imgclf: error: the images have labels the model does not know: orchid", err
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    assert main(["report", str(model_file), str(bad), "--out", str(kept)]) == 2
    assert [f.name for f in kept.iterdir()] == ["notes.txt"]


def test_label_calibration_by_hand():
    from imgclf.insight.label_sets import label_calibration

    probs = np.array([[0.05, 0.95], [0.15, 0.85]])  # bin 0: 0.05 (no), bin 1: 0.15 (yes); bins 8-9: 0.85, 0.95 (yes)
    found = label_calibration(probs, np.array([[0, 1], [1, 1]]))
    counts = [b["count"] for b in found["bins"]]
    assert counts == [1, 1, 0, 0, 0, 0, 0, 0, 1, 1]
    gaps = abs(0 - 0.05) + abs(1 - 0.15) + abs(1 - 0.85) + abs(1 - 0.95)
    assert found["expected_calibration_error"] == pytest.approx(gaps / 4)


def test_paths_not_done_yet_refuse_it(trained, manifest, tmp_path):
    from imgclf import ImageClassificationTrainer
    from imgclf.inference.precision import measure_precisions

    model, held_out = trained
    with pytest.raises(OptionError, match="multi-label model runs at fp32"):
        measure_precisions(model, held_out, ["fp32", "bf16"])
    images = load_dataset(manifest).train
    for options, message in (({"fine_tune": True}, "head only"), ({"precision": "int8"}, "not certified"),
                             ({"resume": True}, "no checkpoint")):  # fmt: skip
        with pytest.raises(OptionError, match=message):
            ImageClassificationTrainer(progress=False, workspace=tmp_path, **options).fit(images)


@pytest.mark.parametrize("argv", [["predict", "{model}", "{image}", "--precision", "bf16"],
                                  ["predict", "{onnx}", "{image}", "--precision", "int8"],
                                  ["export", "{model}", "--precision", "int8", "--out", "{tmp}/m.onnx"]])  # fmt: skip
def test_a_lossy_precision_is_one_line_for_a_multilabel_model(argv, trained, model_file, tmp_path, capsys):
    """predict --precision bf16 ran a multi-label model at bf16, uncertified (its sets may move), and int8
    said to train with --precision int8 or call calibrate_int8, both of which refuse it."""
    from imgclf.cli import main

    onnx = trained[0].export_onnx(tmp_path / "multi.onnx") if "{onnx}" in argv else ""
    fill = {"{model}": str(model_file), "{image}": str(trained[1][0].source), "{onnx}": str(onnx), "{tmp}": str(tmp_path)}
    assert main([fill.get(a, a.replace("{tmp}", str(tmp_path))) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("imgclf: error: --precision ") and "multi-label models run at fp32 only" in err, err
    assert len(err.splitlines()) == 1 and not (tmp_path / "m.onnx").exists()


def test_frame_applies_to_multilabel_training_alone(tmp_path):
    from imgclf import ImageClassificationTrainer, load_images_from_directory

    images = load_images_from_directory(FLOWERS)[:4]
    with pytest.raises(OptionError, match="applies to multi-label training"):
        ImageClassificationTrainer(frame="whole", progress=False, workspace=tmp_path).fit(images)
