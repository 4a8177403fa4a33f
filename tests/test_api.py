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


def test_dir_shows_the_public_names_and_hides_the_helpers():
    """Issue 21 item 14: dir(imgclf) left out the names loaded on first use (ImageClassificationTrainer,
    audit...) and showed typing's Any and TYPE_CHECKING."""
    names = dir(imgclf)
    assert [n for n in names if not n.startswith("_")] == sorted(imgclf.__all__)
    assert "__version__" in names and "__doc__" in names
    for helper in ("Any", "TYPE_CHECKING", "import_module", "annotations"):
        assert helper not in names
    code = "import imgclf; print(','.join(n for n in dir(imgclf) if not n.startswith('_')))"
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert fresh.split(",") == sorted(imgclf.__all__)  # the same before any name was loaded
