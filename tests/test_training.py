"""Training promises the docs make in numbers: the learning-rate schedule, and a loss that stops
being finite stops training (docs/python-api.md, docs/reliability.md)."""

import json

import pytest

pytest.importorskip("torch")

from imgclf import ImageClassificationTrainer, load_images_from_directory  # noqa: E402
from imgclf.cli import main  # noqa: E402

from .conftest import small_flower_folder  # noqa: E402


def test_default_schedule_is_0_01_decayed_by_0_94_every_2_epochs(tmp_path, workspace):
    """docs/python-api.md: ``lr_schedule="exponential"  # 0.01 decayed by 0.94 every 2 epochs``.
    The photos are the session model's, so their features come from the shared workspace."""
    images = load_images_from_directory(small_flower_folder(tmp_path / "data"))
    model = ImageClassificationTrainer(epochs=7, workspace=workspace, progress=False).fit(images)
    rates = [h["learning_rate"] for h in model.info["history"]]
    assert rates == pytest.approx([0.01, 0.01, 0.0094, 0.0094, 0.008836, 0.008836, 0.00830584], rel=1e-9)


def test_a_loss_that_is_not_finite_stops_training_without_a_model(tmp_path, capsys, workspace):
    """docs/reliability.md: "A training loss that stops being finite (a learning rate far too high)
    stops with a message instead of saving a model of NaNs"."""
    folder = small_flower_folder(tmp_path / "data", per_class=3, labels=("daisy", "tulips"))
    # 1e37 overflows float32 in the first epoch; 1e30 still gives a finite (huge) loss
    out, metrics = tmp_path / "m.imgclf", tmp_path / "metrics.json"
    code = main(["train", str(folder), "--learning-rate", "1e37", "--epochs", "3", "--workspace", str(workspace),
                 "--out", str(out), "--metrics-json", str(metrics), "-q"])  # fmt: skip
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("imgclf: error:")]
    assert code == 2 and len(lines) == 1, err
    assert "training diverged in epoch 1 (the loss is not a finite number)" in lines[0]
    assert "lower the learning rate (now 1e+37)" in lines[0]
    assert not out.exists() and not metrics.exists()
    assert "Traceback" not in err
    json.dumps(err)  # printable
