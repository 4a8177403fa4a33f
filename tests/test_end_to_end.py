"""The README's main job: `imgclf train` with defaults, then `imgclf predict`."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")

from .conftest import PREDICT  # noqa: E402


@pytest.mark.slow
def test_default_train_then_predict_seed_images(tmp_path):
    env_cmd = [sys.executable, "-m", "imgclf.cli"]
    ws = tmp_path / "ws"
    train = subprocess.run([*env_cmd, "train", "--workspace", ws, "-q", "--metrics-json", "m.json"],
                           cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert train.returncode == 0, train.stderr
    assert (tmp_path / "imageClassifier.imgclf").is_file()
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["micro_accuracy"] >= 0.85  # 40 held-out photos, 5 labels: measured 0.875 (35 of 40)
    again = subprocess.run([*env_cmd, "train", "--workspace", ws, "-q", "--out", "second.imgclf",
                            "--metrics-json", "again.json"], cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "0 images through the network, 200 from the workspace cache" in again.stdout  # held-out ones too
    assert json.loads((tmp_path / "again.json").read_text()) == metrics  # the same model from the cache

    pred = subprocess.run([*env_cmd, "predict", "imageClassifier.imgclf", PREDICT, "--json"],
                          cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert pred.returncode == 0, pred.stderr
    labels = {r["file"].rsplit("/", 1)[-1]: r["label"] for r in json.loads(pred.stdout)}
    expected = dict(line.split("\t") for line in (PREDICT / "expected.tsv").read_text().splitlines())
    assert labels == expected  # all four seed images
