"""The README's main job: `imgclf train` with defaults, then `imgclf predict`."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")

from .conftest import PREDICT  # noqa: E402

#: Runs imgclf's CLI, then prints which heavy modules the run imported (one JSON line).
SPY_IMPORTS = (
    "import sys, json; from imgclf.cli import main; rc = main(sys.argv[1:]); "
    "print(json.dumps({m: m in sys.modules for m in ('timm', 'torch._dynamo', 'onnx', 'torchvision')})); sys.exit(rc)"
)


@pytest.mark.slow
def test_default_train_then_predict_seed_images(tmp_path):
    """Fresh, then warm on the same workspace: the same model; no run imports timm,
    torch.optim or onnx (the fresh one runs the shipped graph template), and the warm one
    builds no network at all. Then the four seed images get their expected labels."""
    env_cmd = [sys.executable, "-m", "imgclf.cli"]
    ws = tmp_path / "ws"
    train = subprocess.run([sys.executable, "-c", SPY_IMPORTS, "train", "--workspace", ws, "-q", "--metrics-json",
                            "m.json"], cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert train.returncode == 0, train.stderr
    assert (tmp_path / "imageClassifier.imgclf").is_file()
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["micro_accuracy"] >= 0.85  # 40 held-out photos, 5 labels: measured 0.875 (35 of 40)
    again = subprocess.run([sys.executable, "-c", SPY_IMPORTS, "train", "--workspace", ws, "-q", "--out",
                            "second.imgclf", "--metrics-json", "again.json"], cwd=tmp_path, capture_output=True,
                           text=True)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "200 images through the network (engine onnxruntime, fp32)" in train.stdout  # the pass says what ran
    assert "0 images through the network, 200 from the workspace cache" in again.stdout  # held-out ones too
    assert json.loads((tmp_path / "again.json").read_text()) == metrics  # the same model from the cache
    for run in (train, again):
        imported = json.loads(run.stdout.strip().splitlines()[-1])
        assert imported == {"timm": False, "torch._dynamo": False, "onnx": False, "torchvision": False}

    from imgclf import load_model

    first, second = load_model(tmp_path / "imageClassifier.imgclf"), load_model(tmp_path / "second.imgclf")
    assert (first.head.weight == second.head.weight).all() and first.info["metrics"] == second.info["metrics"]
    pred = subprocess.run([*env_cmd, "predict", "imageClassifier.imgclf", PREDICT, "--json"],
                          cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert pred.returncode == 0, pred.stderr
    labels = {r["file"].rsplit("/", 1)[-1]: r["label"] for r in json.loads(pred.stdout)}
    expected = dict(line.split("\t") for line in (PREDICT / "expected.tsv").read_text().splitlines())
    assert labels == expected  # all four seed images
    second_answers = {r.label for r in second.predict_batch(sorted(PREDICT.glob("*g")))}
    assert second_answers == set(expected.values())
