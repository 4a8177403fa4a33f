"""Training on from an existing model (issue 24 item 4): the model file keeps its training images'
pooled features, and ``train NEW --from old.imgclf`` adds images and labels to what it learned,
without the old photos; what cannot be mixed is one line."""

from __future__ import annotations

import csv
import hashlib
import json
import re

import numpy as np
import pytest

pytest.importorskip("torch")

from imgclf import ImageClassificationTrainer, load_model  # noqa: E402
from imgclf.errors import ModelFileError, OptionError  # noqa: E402
from imgclf.inference.model import read_model_config  # noqa: E402
from imgclf.inference.stored import StoredFeatures, read_stored  # noqa: E402

from .conftest import FLOWERS, PREDICT, small_flower_folder  # noqa: E402

OLD_LABELS = ("daisy", "dandelion", "roses")


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from imgclf.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def old_run(tmp_path_factory, workspace):
    """A 3-label model, 8 photos each, 2 of them held out per label: (file, held-out photos)."""
    folder = small_flower_folder(tmp_path_factory.mktemp("old"), per_class=8, labels=OLD_LABELS)
    trainer = ImageClassificationTrainer(epochs=15, workspace=workspace, progress=False)
    model, held_out = trainer.fit_and_hold_out(folder, test_fraction=0.25)
    return model.save(tmp_path_factory.mktemp("old-model") / "old.imgclf"), folder, held_out


@pytest.fixture(scope="module")
def old_file(old_run):
    return old_run[0]


@pytest.fixture(scope="module")
def tulips(tmp_path_factory):
    return small_flower_folder(tmp_path_factory.mktemp("new"), per_class=8, labels=("tulips",))


@pytest.fixture(scope="module")
def extended(old_file, tulips, workspace):
    """``old_file`` trained on with a fourth label's photos alone (the Python API)."""
    trainer = ImageClassificationTrainer(epochs=15, workspace=workspace, progress=False, from_model=old_file)
    return trainer.fit_and_hold_out(tulips, test_fraction=0.25)


def test_a_model_file_keeps_its_training_features(old_file):
    config = read_model_config(old_file)
    stored = read_stored(old_file, config)
    assert config["stored_features"]["images"] == len(stored) == 24 and config["stored_features"]["held_out"] == 6
    assert stored.features.dtype == np.float16 and stored.features.shape == (24, config["num_features"])
    assert sorted(np.bincount(stored.labels[stored.held_out]).tolist()) == [2, 2, 2]


def test_a_loaded_model_carries_its_features_when_saved_again(old_file, tmp_path):
    """certify rewrites a model file in place: the features must survive load and save."""
    model = load_model(old_file)
    assert model.stored_features_ is None  # prediction never holds them
    again = model.save(tmp_path / "again.imgclf")
    before, after = read_stored(old_file, read_model_config(old_file)), read_stored(again, read_model_config(again))
    assert np.array_equal(before.features, after.features) and np.array_equal(before.labels, after.labels)


def test_training_on_adds_a_label_from_its_photos_alone(extended, old_file):
    model, held_out = extended
    assert model.labels == [*OLD_LABELS, "tulips"]  # old labels first, in their order, new appended
    was = model.info["trained_on_from"]
    assert was["sha256"] == hashlib.sha256(old_file.read_bytes()).hexdigest() and was["labels"] == list(OLD_LABELS)
    assert model.info["training"]["train_images"] == 18 + 6  # the old training features and the new photos
    assert {im.label for im in held_out} == {"tulips"}
    metrics = model.evaluate_held_out(held_out)  # the new held-out photos and the old held-out features
    assert metrics.count == 2 + 6 and metrics.micro_accuracy >= 0.75
    assert model.predict(PREDICT / "classic-daisy.jpg").label == "daisy"
    tulip = sorted((FLOWERS / "tulips").glob("*.jpg"))[-1]  # not one it was trained on
    assert model.predict(tulip).label == "tulips"


def test_a_model_trained_on_keeps_old_and_new_features_for_the_next(extended, tmp_path):
    model, _ = extended
    path = model.save(tmp_path / "four.imgclf")
    config = read_model_config(path)
    stored = read_stored(path, config)
    assert len(stored) == 24 + 8 and config["stored_features"]["held_out"] == 6 + 2
    assert config["trained_on_from"]["stored_images"] == 24
    assert load_model(path).labels == model.labels


def test_the_cap_keeps_an_equal_share_of_each_label():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 100 + [1] * 10 + [2] * 50)
    x = rng.normal(size=(160, 8)).astype(np.float32)
    per_image = 2 * 8 + 4 + 1
    stored = StoredFeatures.select((x, labels), (x[:0], labels[:0]), cap_mb=70 * per_image / 2**20, seed=1)
    assert len(stored) == 70 and np.bincount(stored.labels).tolist() == [30, 10, 30] and stored.of_images == 160
    assert StoredFeatures.select((x, labels), (x[:0], labels[:0]), cap_mb=0, seed=1) is None


def test_keep_features_mb_0_leaves_them_out(tulips, workspace, tmp_path, old_file):
    trainer = ImageClassificationTrainer(epochs=2, workspace=workspace, progress=False, keep_features_mb=0,
                                         from_model=old_file)  # fmt: skip
    path = trainer.fit(tulips).save(tmp_path / "none.imgclf")
    config = read_model_config(path)
    assert "stored_features" not in config and read_stored(path, config) is None
    with pytest.raises(ModelFileError, match="keeps no training features"):
        ImageClassificationTrainer(from_model=path).validate()


def test_a_backbone_with_other_weights_is_refused(old_file):
    import torch
    from safetensors.torch import load_file

    from imgclf.nets.archs import get_architecture, preprocessing_for
    from imgclf.training.train_on import check_same_backbone, open_old_model

    arch = get_architecture("efficientnet_lite0")
    old = open_old_model(old_file, arch, preprocessing_for(arch), fine_tune=False)
    state = {k[len("backbone.") :]: v for k, v in load_file(str(old_file)).items() if k.startswith("backbone.")}
    check_same_backbone(old, state, "here")  # the same weights pass
    state[next(iter(state))] = state[next(iter(state))] + torch.tensor(1e-3)
    with pytest.raises(OptionError, match="other pretrained weights"):
        check_same_backbone(old, state, "here")


def _manifest(folder, path):
    with open(path, "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["path", "label"])
        for image in sorted(folder.rglob("*.jpg")):
            rows.writerow([str(image), image.parent.name])
    return path


def test_the_command_line_trains_on_from_a_manifest(old_file, tulips, workspace, tmp_path, capsys):
    manifest = _manifest(tulips, tmp_path / "new.csv")
    out = tmp_path / "new.imgclf"
    code, printed, err = run_cli(["train", manifest, "--from", old_file, "--out", out, "--epochs", "5",
                                  "--workspace", workspace, "-q", "--metrics-json", tmp_path / "m.json"], capsys)  # fmt: skip
    assert code == 0, err
    assert "on from" in printed and "holding out 20% of the readable new images" in printed
    line = next(x for x in printed.splitlines() if x.startswith("Trained on from old.imgclf"))
    assert "18 stored training features" in line and "new: tulips" in line and "6 held-out features" in line
    assert json.loads((tmp_path / "m.json").read_text())["count"] == 6 + 2
    assert read_model_config(out)["labels"] == [*OLD_LABELS, "tulips"]


def test_one_new_photo_is_measured_with_the_old_held_out_features(old_file, tulips, workspace, tmp_path, capsys):
    """Too few new photos to hold one out: training ran, then "no readable images to evaluate on"
    and nothing saved. The old model's held-out features still measure the new one."""
    manifest = tmp_path / "one.csv"
    manifest.write_text(f"path,label\n{sorted(tulips.rglob('*.jpg'))[0]},tulips\n")
    out = tmp_path / "new.imgclf"
    code, printed, err = run_cli(["train", manifest, "--from", old_file, "--out", out, "--epochs", "5",
                                  "--workspace", workspace, "-q", "--metrics-json", tmp_path / "m.json"], capsys)  # fmt: skip
    assert code == 0, err
    assert "evaluating on the 6 held out" in printed and "tulips have too few readable images" in err
    assert json.loads((tmp_path / "m.json").read_text())["count"] == 6
    assert read_model_config(out)["labels"] == [*OLD_LABELS, "tulips"]


def test_the_same_photos_again_are_said(old_run, workspace, tmp_path, capsys):
    """--from with the photos it was trained on: each would count twice (and held-out ones be trained on)."""
    old_file, folder, _ = old_run
    code, printed, err = run_cli(["train", folder, "--from", old_file, "--out", tmp_path / "again.imgclf",
                                  "--epochs", "3", "--workspace", workspace, "-q"], capsys)  # fmt: skip
    assert code == 0, err
    assert "warning: --from " in err and ": 24 of the new images are already in it" in err, err


@pytest.mark.parametrize("extra, said", [
    (["--arch", "efficientnet_lite1"], "--arch efficientnet_lite1: --from .* is efficientnet_lite0; training on "
                                       "keeps its architecture: give --arch efficientnet_lite0"),
    (["--fine-tune"], "--from with --fine-tune: fine-tuning trains the backbone on the photos"),
    (["--keep-features-mb", "5", "--no-keep-features"], "give --keep-features-mb or --no-keep-features, not both"),
])  # fmt: skip
def test_what_cannot_be_mixed_is_one_line(extra, said, old_file, tulips, tmp_path, capsys):
    code, printed, err = run_cli(["train", tulips, "--from", old_file, "--out", tmp_path / "x.imgclf", *extra], capsys)
    assert code == 2 and printed == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("imgclf: error: ") and re.search(said, err), err


def test_a_file_that_is_not_a_model_or_keeps_no_features_is_one_line(old_file, tulips, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    config = read_model_config(old_file)
    del config["stored_features"]
    tensors = {k: v for k, v in load_file(str(old_file)).items() if not k.startswith("stored.")}
    before = tmp_path / "before.imgclf"  # as a model saved before models kept their features
    save_file(tensors, str(before), metadata={"imgclf": json.dumps(config)})
    photo = next((FLOWERS / "daisy").glob("*.jpg"))
    for source, said in ((before, "keeps no training features"), (photo, "not a readable imgclf model file"),
                         (tmp_path / "missing.imgclf", "model file not found")):  # fmt: skip
        code, printed, err = run_cli(["train", tulips, "--from", source, "--out", tmp_path / "x.imgclf"], capsys)
        assert code == 2 and printed == "" and len(err.strip().splitlines()) == 1 and said in err, err


def test_without_arch_the_old_models_architecture_is_used(old_file, tmp_path, capsys):
    """`train NEW --from lite1.imgclf` needs no --arch: the old model's is taken, in one line; a typed
    --arch is the user's (and a mismatch stays the one-line refusal above)."""
    import argparse

    from safetensors.torch import load_file, save_file

    from imgclf.cli import _arch_from_old_model, _given

    config = read_model_config(old_file)
    config["arch"] = "efficientnet_lite1"  # what a Lite1 model's file says
    lite1 = tmp_path / "lite1.imgclf"
    save_file(load_file(str(old_file)), str(lite1), metadata={"imgclf": json.dumps(config)})
    args = argparse.Namespace(from_model=str(lite1), arch="efficientnet_lite0", argv=["train", "new/", "--from", "x"])
    assert not _given(args, "--arch")
    _arch_from_old_model(args)
    assert args.arch == "efficientnet_lite1"
    assert capsys.readouterr().out == f"Architecture: efficientnet_lite1, as {lite1} (training on keeps it)\n"
    typed = argparse.Namespace(argv=["train", "new/", "--arch=efficientnet_lite0"])
    assert _given(typed, "--arch") and _given(argparse.Namespace(argv=["--arch", "x"]), "--arch")
    broken = argparse.Namespace(from_model=str(tmp_path / "missing.imgclf"), arch="efficientnet_lite0", argv=[])
    _arch_from_old_model(broken)  # left to training on's own one-line checks
    assert broken.arch == "efficientnet_lite0"


def test_training_on_scores_as_training_from_scratch_on_both(old_run, extended, tulips, workspace):
    """The acceptance test's shape, small: the 3-label model trained on with the fourth label's photos
    and a 4-label model from scratch on the same training photos agree on the same held-out photos."""
    from imgclf import load_images_from_directory

    _, old_folder, old_held = old_run
    model, new_held = extended
    held = {im.name for im in [*old_held, *new_held]}
    photos = load_images_from_directory(old_folder) + load_images_from_directory(tulips)
    scratch = ImageClassificationTrainer(epochs=15, workspace=workspace, progress=False).fit(
        [im for im in photos if im.name not in held])
    test = [*old_held, *new_held]
    on, fresh = model.evaluate(test), scratch.evaluate(test)
    assert abs(on.micro_accuracy - fresh.micro_accuracy) <= 1 / len(test) + 1e-9  # one photo at most
    agree = [a.label == b.label for a, b in zip(model.predict_batch([im.source for im in test]),
                                              scratch.predict_batch([im.source for im in test]))]
    assert sum(agree) >= len(test) - 1
