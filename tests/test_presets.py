"""Presets (--quality fast|balanced|best) and the time limit (--time-limit): what each decides,
that it says so in one line and records it, and that fine-tuning keeps to the planned epochs."""

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from imgclf import ImageClassificationTrainer, OptionError, load_images_from_directory  # noqa: E402
from imgclf.cli import main  # noqa: E402
from imgclf.training.budget import EpochCosts, epochs_that_fit, plan_line  # noqa: E402
from imgclf.training.finetune import FineTuneOptions  # noqa: E402
from imgclf.training.presets import best_options, plan_quality  # noqa: E402

from .conftest import FLOWERS, SANITY, small_flower_folder  # noqa: E402

BRAIN = Path(__file__).parent / "data" / "brain-mri"


@pytest.fixture(scope="module")
def distances(workspace):
    """The feature distance from ImageNet of real photos, from the pooled features training computes:
    8 ImageNet photos, 17 flowers, the 8 bundled MRI slices."""
    from imgclf.nets.archs import get_architecture, preprocessing_for
    from imgclf.nets.distance import feature_distance, imagenet_feature_moments
    from imgclf.nets.features import FeatureExtractor
    from imgclf.nets.pretrained import PretrainedNetwork

    arch = get_architecture("efficientnet_lite0")
    prep = preprocessing_for(arch)
    network = PretrainedNetwork(arch, None, "cpu", "auto", prep.input_size)
    extractor = FeatureExtractor(network.feature_engine(), prep, network.cache_key, workspace=workspace,
                                 progress=False)  # fmt: skip
    network.keep_tensors_in(extractor.cache.folder, True)
    sets = {
        "imagenet": load_images_from_directory(SANITY, use_folder_name_as_label=False)[:8],
        "flowers": load_images_from_directory(FLOWERS)[::12],
        "brain": load_images_from_directory(BRAIN),
    }
    features = {name: extractor.transform(images).features for name, images in sets.items()}
    moments = imagenet_feature_moments(arch, network.for_model())
    return {name: feature_distance(f, moments) for name, f in features.items()}


def test_feature_distance_tells_scans_from_photos(distances):
    """docs/presets.md: "ImageNet photos 0.026, the bundled flowers 0.07, brain MRI slices 0.20 to 0.22
    ... at 0.12 or more, unlike ImageNet". Measured here (fp32 ONNX Runtime features) on an AMD Zen 3
    (AVX2): imagenet 0.024, flowers 0.066, brain 0.206; on a Zen 5 (AVX-512 bf16): 0.038, 0.061, 0.204
    (8 ImageNet photos are few: on all 19 the Zen 5 gives 0.025, as the docs say)."""
    assert distances["imagenet"] < distances["flowers"] < 0.12 < distances["brain"]
    assert distances["imagenet"] == pytest.approx(0.026, abs=0.015)
    assert distances["flowers"] == pytest.approx(0.07, abs=0.02)
    assert 0.17 <= distances["brain"] <= 0.26


def test_moments_need_the_final_batch_norm():
    from imgclf.nets.archs import Architecture, get_architecture
    from imgclf.nets.distance import imagenet_feature_moments

    assert imagenet_feature_moments(Architecture("x", "x"), {}) is None  # the table does not say which layer
    assert imagenet_feature_moments(get_architecture("efficientnet_lite0"), {"conv_head.weight": 0}) is None
    # gamma 1, beta 0: ReLU6 of a standard normal has mean 1/sqrt(2 pi) = 0.3989 and variance 0.3408
    mean, var = imagenet_feature_moments(get_architecture("efficientnet_lite0"),
                                         {"bn2.weight": np.ones(2), "bn2.bias": np.zeros(2)})  # fmt: skip
    assert mean == pytest.approx([0.3989, 0.3989], abs=1e-3) and var == pytest.approx([0.3408, 0.3408], abs=2e-3)


def _plan(quality="balanced", fine_tune=False, distance=0.2, fewest=40, time_limit=None, why=None):
    return plan_quality(quality, fine_tune, None, input_size=224, distance=distance, fewest_per_label=fewest,
                        time_limit=time_limit, why_head_only=why)  # fmt: skip


def test_balanced_decides_from_the_photos_and_says_why_in_one_line():
    cases = [
        (_plan(distance=0.07), False, "look like ImageNet (feature distance 0.070 < 0.12)"),
        (_plan(distance=0.1199), False, "0.120 < 0.12"),  # the boundary
        (_plan(distance=0.12), True, "unlike ImageNet (feature distance 0.120 >= 0.12)"),
        (_plan(distance=0.21, fewest=9), False, "a label has only 9 training photos"),
        (_plan(distance=None), False, "cannot be read from this network's features"),
        (_plan(why="multi-label models train their head only for now"), False, "multi-label"),
        (_plan(distance=0.07, fine_tune=True), True, "with --fine-tune"),
    ]
    for plan, fine_tunes, said in cases:
        assert plan.fine_tune is fine_tunes, plan.lines
        assert len(plan.lines) == 1 and "\n" not in plan.lines[0] and said in plan.lines[0], plan.lines
    assert _plan(distance=0.21).time_limit == 600  # balanced's own limit: 10 minutes, docs/presets.md
    assert _plan(distance=0.21, time_limit=90).time_limit == 90
    assert _plan(distance=0.21).options == best_options(None, 224)  # best's recipe, planned to the limit
    assert _plan(distance=0.07, fine_tune=True).options == FineTuneOptions()  # --fine-tune: the speed-first one
    assert _plan("balanced", True, 0.07).time_limit is None  # --fine-tune alone: no limit unless given
    fast = _plan("fast", distance=0.3)
    assert not fast.fine_tune and fast.lines[0].startswith("quality fast: head only")


def test_best_recipe_and_what_the_caller_set():
    best = _plan("best", distance=0.07)
    assert best.fine_tune and best.recipe == "best fine-tune" and best.time_limit is None
    o = best.options
    assert (o.train_size, o.frozen_blocks, o.validation_fraction, o.epochs) == (224, 0, 0.0, 10)
    mine = best_options(FineTuneOptions(frozen_blocks=3, epochs=4), 260)
    assert (mine.train_size, mine.frozen_blocks, mine.epochs) == (260, 3, 4)  # the caller's fields are kept


def test_epochs_are_planned_from_the_first_steps():
    # 3 steps of 16 images took 6 s; scoring at the test size (1.5x the crop's pixels) costs 1.5 / 3 of a step
    costs = EpochCosts.from_steps(6.0, 3, 30, 16, scored_images=72, passes_after=600, pixel_ratio=1.5)
    assert costs.step == 2.0 and costs.epoch == pytest.approx(60 + 72 * 0.0625)  # 1.5 / 3 x 2 s / 16 images
    assert costs.reserve == pytest.approx(600 * 0.0625 + 3)
    assert EpochCosts.from_steps(6.0, 3, 30, 16, scored_images=72, passes_after=0).scoring == pytest.approx(72 / 24)
    assert epochs_that_fit(10_000, costs, 3, 10) == 10
    # 300 s left: reserve 40.5, rest of this epoch 54 + 4.5, then 64.5 s an epoch -> this one and 3 more
    assert epochs_that_fit(300, costs, 3, 10) == 4
    assert epochs_that_fit(90, costs, 3, 10) == 0
    line = plan_line(4, 10, costs, 600, 300)
    assert "4 of 10 fine-tune epochs fit" in line and "--time-limit 17m" in line  # 600 s + 6 x 64.5 s
    assert "not one fine-tune epoch fits" in plan_line(0, 10, costs, 120, 100)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """timm's tiny test network with random weights, as a local file (fine-tuning's mechanics in seconds)."""
    import timm
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("tiny")
    save_file(timm.create_model("test_efficientnet", num_classes=1000).state_dict(), str(folder / "tiny.safetensors"))
    return folder / "tiny.safetensors"


def _clock(values):
    """A ``TimeBudget.remaining`` from a script: each call takes the next value (the last repeats)."""
    values = list(values)

    def remaining(_budget) -> float:
        return values.pop(0) if len(values) > 1 else values[0]

    return remaining


def _tiny_best(tiny, folder, workspace, epochs=5, **kw):
    return ImageClassificationTrainer("test_efficientnet", weights=tiny, quality="best", epochs=3, workspace=workspace,
                                      progress=False, fine_tune_options=FineTuneOptions(epochs=epochs, batch_size=4),
                                      **kw).fit(folder)  # fmt: skip


def test_time_limit_plans_the_epochs_and_lays_the_schedule_over_them(tiny, tmp_path, workspace, monkeypatch):
    """The first steps are timed and the epochs that fit are planned: the run trains those, its
    learning rate falls to zero at the last of them, and the line says what the rest would need."""
    from imgclf.training import budget

    folder = small_flower_folder(tmp_path / "photos", per_class=4)
    costs = EpochCosts(step=1.0, steps=3, scoring=0.0, reserve=1.0)
    monkeypatch.setattr(budget.EpochCosts, "from_steps", classmethod(lambda cls, *a, **k: costs))
    # at the probe (after the first epoch's 3 steps) 8 s are left: 8 - 1 (reserve) = 7, room for 2 more epochs of 3 s;
    # after each epoch, plenty (so a slow machine's real epoch time does not stop it early)
    monkeypatch.setattr(budget.TimeBudget, "remaining", _clock([8.0, 1e6]))
    model = _tiny_best(tiny, folder, workspace, time_limit="10m")
    tuned = [h for h in model.info["history"] if h["phase"] == "fine-tune"]
    info = model.info["fine_tune"]
    assert len(tuned) == 3 and info["planned_epochs"] == 3 and not info["stopped_for_time"]
    assert tuned[-1]["learning_rate"] < 0.2 * tuned[0]["learning_rate"]  # the cosine ends with the plan
    assert any("3 of 5 fine-tune epochs fit" in line for line in info["decisions"])
    assert model.info["quality"]["recipe"] == "best fine-tune" and model.info["quality"]["time_limit_s"] == 600


def test_time_limit_stops_between_epochs_and_keeps_a_whole_model(tiny, tmp_path, workspace, monkeypatch):
    from imgclf.training import budget

    folder = small_flower_folder(tmp_path / "photos", per_class=4)
    monkeypatch.setattr(budget.TimeBudget, "remaining", _clock([1e6, 0.0]))  # plenty, then none after epoch 1
    model = _tiny_best(tiny, folder, workspace, time_limit=3600)
    info = model.info["fine_tune"]
    assert info["stopped_for_time"] and info["kept"] == "fine-tune"
    assert sum(h["phase"] == "fine-tune" for h in model.info["history"]) == 1
    assert any("stopped after epoch 1 of 5" in line for line in info["decisions"])
    assert model.predict(next(folder.glob("*/*.jpg"))).label in {"daisy", "dandelion", "tulips"}


def test_no_epoch_fits_keeps_the_head_only_model(tiny, tmp_path, workspace, monkeypatch):
    from imgclf.training import budget

    folder = small_flower_folder(tmp_path / "photos", per_class=4)
    head = ImageClassificationTrainer("test_efficientnet", weights=tiny, quality="fast", epochs=3, workspace=workspace,
                                      progress=False).fit(folder)  # fmt: skip
    monkeypatch.setattr(budget.TimeBudget, "remaining", _clock([0.0]))
    model = _tiny_best(tiny, folder, workspace, time_limit="1s")
    assert model.info["fine_tune"]["kept"] == "head-only"
    assert any("not one fine-tune epoch fits" in line for line in model.info["fine_tune"]["decisions"])
    for name, tensor in head.head.state_dict().items():  # the head-only model itself, not half an epoch of it
        assert torch.allclose(model.head.state_dict()[name], tensor, atol=1e-6)


def test_fast_is_exactly_the_head_only_model(tmp_path, workspace, capsys):
    """--quality fast, and balanced on photos like ImageNet, give the head-only model: the same
    weights to 1e-6, and each says its choice in one line."""
    folder = small_flower_folder(tmp_path / "photos", per_class=10)
    models = {q: ImageClassificationTrainer(quality=q, workspace=workspace, progress=False).fit(folder)
              for q in ("fast", "balanced")}  # fmt: skip
    fast, balanced = models["fast"], models["balanced"]
    assert "fine_tune" not in fast.info and "fine_tune" not in balanced.info
    assert np.allclose(fast.head.weight.detach().numpy(), balanced.head.weight.detach().numpy(), atol=1e-6)
    assert balanced.info["quality"]["feature_distance"] < 0.12
    out = tmp_path / "m.imgclf"
    capsys.readouterr()
    assert (
        main(["train", str(folder), "--quality", "fast", "--out", str(out), "--workspace", str(workspace), "-q"]) == 0
    )
    printed = capsys.readouterr().out
    assert printed.count("quality fast: head only") == 1


@pytest.mark.parametrize(
    "argv, said",
    [
        (["--quality", "fast", "--fine-tune"], "--quality fast trains the head alone; drop --fine-tune"),
        (["--time-limit", "10x"], "--time-limit must be a positive duration"),
        (["--time-limit", "0"], "--time-limit must be a positive duration"),
        (["--quality", "best", "--from", "old.imgclf"], "--from with --quality best"),
    ],
)
def test_bad_quality_or_time_limit_is_one_line(argv, said, tmp_path, capsys, workspace):
    (tmp_path / "old.imgclf").write_bytes(b"not read: refused first")
    argv = [a if a != "old.imgclf" else str(tmp_path / "old.imgclf") for a in argv]
    code = main(["train", str(FLOWERS), "--out", str(tmp_path / "m.imgclf"), "--workspace", str(workspace), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and said in err and "\n" not in err, err


def test_time_limit_takes_durations():
    from imgclf.options import parse_duration

    assert [parse_duration(v) for v in ("90s", "10m", "1.5h", "1h30m", "600", 45, 2.5)] == [
        90, 600, 5400, 5400, 600, 45, 2.5]  # fmt: skip
    for bad in ("", "m", "-5m", "1e999", "inf", "10 minutes", True, None, 0, -3, float("nan"), float("inf")):
        assert parse_duration(bad) is None, bad
    with pytest.raises(OptionError, match="time_limit"):
        ImageClassificationTrainer(time_limit="soon").validate()
