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
        _, node_label, prob = out.stdout.strip().split("\t")
        python = small_model.predict(PREDICT / name)
        assert node_label == python.label == label
        assert abs(float(prob) - python.probability) < 0.02  # sharp's resize differs slightly from Pillow's
