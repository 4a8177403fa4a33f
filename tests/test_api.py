"""The public API: every advertised name resolves, and importing imgclf stays torch-free."""

import subprocess
import sys

import imgclf


def test_every_public_name_resolves():
    missing = [name for name in imgclf.__all__ if getattr(imgclf, name, None) is None]
    assert missing == []
    assert imgclf.FineTuneOptions().epochs >= 1  # the documented fine-tune options type is public


def test_import_does_not_load_torch():
    code = "import sys, imgclf; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
