"""The exported ONNX model used from another language: Node.js + onnxruntime-node."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("onnx")

from .conftest import PREDICT  # noqa: E402

EXAMPLE = Path(__file__).parent.parent / "examples" / "node"


#: .ci/run installs the example's packages (npm ci), so in CI this test runs: it fails there, never skips.
IN_CI = os.environ.get("CI") == "true"


def _unavailable(reason: str):
    if IN_CI:
        pytest.fail(f"{reason} (CI installs them in .ci/run)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def node_example():
    if not shutil.which("node") or not shutil.which("npm"):
        _unavailable("node/npm not installed")
    if not (EXAMPLE / "node_modules" / "onnxruntime-node").is_dir():
        out = subprocess.run(["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=EXAMPLE,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
        if out.returncode != 0:
            _unavailable(f"npm could not install onnxruntime-node: {out.stderr.strip().splitlines()[-1:]}")
    return EXAMPLE / "classify.mjs"


@pytest.mark.slow
def test_node_classifies_like_python(node_example, small_model, small_onnx_model):
    onnx_path = small_onnx_model
    for name, label in (("classic-daisy.jpg", "daisy"), ("classic-tulip.jpg", "tulips")):
        out = subprocess.run(["node", str(node_example), str(onnx_path), str(PREDICT / name)],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert out.returncode == 0, out.stderr
        _, node_label, prob, known = out.stdout.strip().split("\t")
        python = small_model.predict(PREDICT / name)
        assert node_label == python.label == label
        assert abs(float(prob) - python.probability) < 0.02  # sharp's resize differs slightly from Pillow's
        assert known == {True: "known", False: "unknown"}[python.known]  # the detector's output, read as Python does


@pytest.mark.slow
def test_node_answers_a_multilabel_model_with_its_sets_on_the_whole_frame(node_example, small_multilabel_model):
    """The example cropped the centre of every image and printed the single most likely label:
    a multi-label model's photos at the edges were cut off, and its sets never said."""
    model, onnx_path, held_out = small_multilabel_model
    assert model.preprocessing.frame == "whole" and model.preprocessing.input_shape == (224, 448)
    for image in held_out:
        out = subprocess.run(["node", str(node_example), str(onnx_path), str(image)],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert out.returncode == 0, out.stderr
        _, said, probs, known = out.stdout.rstrip("\n").split("\t")
        python = model.predict(image)
        node = dict(zip(said.split(";"), map(float, probs.split(";")))) if said else {}
        for label, threshold in zip(model.labels, model.thresholds):
            p = python.scores[label]
            if abs(p - threshold) > 0.02:  # sharp's resize differs slightly from Pillow's
                assert (label in node) == (p >= threshold), (image, label, p, threshold, out.stdout)
            if label in node:
                assert abs(node[label] - p) < 0.02
        assert list(node) == [lbl for lbl, _ in python.labels if lbl in node]  # most likely first
        assert known == {True: "known", False: "unknown", None: "-"}[python.known]
