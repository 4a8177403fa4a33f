"""The main job stays fast and says what it chose: nothing built that a run does not use,
the head's optimizer is torch's SGD step for step, precision decided in one line,
certificates made by cross-fitting and by ``imgclf certify``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from imgclf.cli import main

from .conftest import FLOWERS, PREDICT, small_flower_folder


@pytest.mark.parametrize("momentum, decay", [(0.9, 0.0), (0.9, 1e-3), (0.0, 0.0)])
def test_head_sgd_is_torch_sgd_step_for_step(momentum, decay):
    from imgclf.training.optim import HeadSGD

    torch.manual_seed(0)
    x, y = torch.randn(64, 32), torch.randint(0, 4, (64,))
    heads = [torch.nn.Linear(32, 4) for _ in range(2)]
    heads[1].load_state_dict(heads[0].state_dict())
    ours = HeadSGD(heads[0].parameters(), lr=0.05, momentum=momentum, nesterov=momentum > 0, weight_decay=decay)
    theirs = torch.optim.SGD(heads[1].parameters(), lr=0.05, momentum=momentum, nesterov=momentum > 0,
                             weight_decay=decay)  # fmt: skip
    for step in range(60):
        for head, opt in zip(heads, (ours, theirs)):
            if step == 30:  # a learning-rate change mid-run, as the schedules make
                opt.param_groups[0]["lr"] = 0.02
            loss = torch.nn.functional.cross_entropy(head(x[step % 8 :: 8]), y[step % 8 :: 8])
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(heads[0].parameters(), heads[1].parameters()))
    if momentum:  # the checkpoint's layout: torch's state_dict, readable by either
        saved = ours.state_dict()
        assert sorted(saved["state"]) == [0, 1] and saved["param_groups"][0]["nesterov"] is True
        theirs.load_state_dict(saved)


# A warm run builds no network and gives the same model: tests/test_end_to_end.py checks it on the
# README's main job itself (it trained a second, smaller model here before).


def test_held_out_metrics_from_cached_features_equal_a_network_pass(small_model, tmp_path):
    from imgclf import ImageClassificationTrainer, load_images_from_directory

    images = load_images_from_directory(small_flower_folder(tmp_path / "p", per_class=8))
    model, held_out = ImageClassificationTrainer(epochs=10, workspace=tmp_path / "ws", progress=False,
                                                 precision="fp32").fit_and_hold_out(images)  # fmt: skip
    assert model.held_out_features_ is not None and len(model.held_out_features_) == len(held_out) == 6
    quick, full = model.evaluate_held_out(held_out), model.evaluate(held_out)
    assert quick.micro_accuracy == full.micro_accuracy and abs(quick.log_loss - full.log_loss) < 1e-5


def test_training_says_its_precision_in_one_line_on_either_cpu(tmp_path, monkeypatch, capsys):
    folder = small_flower_folder(tmp_path / "photos")
    args = ["train", str(folder), "--workspace", str(tmp_path / "ws"), "--epochs", "5", "-q"]
    monkeypatch.setenv("IMGCLF_CPU_CAPABILITIES", "none")
    assert main([*args, "--out", str(tmp_path / "a.imgclf")]) == 0
    assert "Precision: fp32: this CPU has no native bf16 (IMGCLF_CPU_CAPABILITIES)" in capsys.readouterr().out
    monkeypatch.setenv("IMGCLF_CPU_CAPABILITIES", "bf16,vnni")
    assert main([*args, "--out", str(tmp_path / "b.imgclf")]) == 0
    out = capsys.readouterr().out
    assert "Precision: fp32: 18 images are too few to certify bf16 (needs 300 the head did not see)" in out
    monkeypatch.setenv("IMGCLF_CPU_CAPABILITIES", "vnni")
    assert main([*args, "--precision", "bf16", "--out", str(tmp_path / "c.imgclf")]) == 2
    assert "precision bf16: this CPU has no native bf16" in capsys.readouterr().err


def test_cross_fitting_scores_every_image_with_a_head_that_never_saw_it(small_model, monkeypatch):
    """On this CPU OpenVINO's bf16 is fp32 (the override only pretends), so agreement is
    complete: what is tested is that every image is counted once, unseen by its head."""
    from imgclf import load_images_from_directory
    from imgclf.nets.engines import installed
    from imgclf.training.certify import cross_fitted_certificate

    if not installed("openvino"):
        pytest.skip("OpenVINO is not installed")
    monkeypatch.setenv("IMGCLF_CPU_CAPABILITIES", "bf16")
    images = load_images_from_directory(FLOWERS)
    images = [im for im in images if im.label in small_model.labels][::4]  # 30 photos
    from imgclf.data.imaging import load_array

    features = small_model._engine_for(32, force=True)(
        np.stack([load_array(im.source, small_model.preprocessing) for im in images]))
    y = np.array([small_model.labels.index(im.label) for im in images])
    fitted = []

    def fit_head(x, labels):
        fitted.append(len(labels))
        head = torch.nn.Linear(x.shape[1], len(small_model.labels))
        head.weight.data = torch.from_numpy(np.stack([x[labels == k].mean(0) for k in range(3)])) / 10
        head.bias.data.zero_()
        return head

    entry = cross_fitted_certificate(fit_head, small_model, "bf16", (features[:24], y[:24], images[:24]),
                                     (features[24:], y[24:], images[24:]))  # fmt: skip
    assert len(fitted) == 5 and max(fitted) < 24 and sum(fitted) == 4 * 24  # each image left out of one head
    assert entry["images"] == entry["unseen_images"] == 30 and entry["cpu"] == "bf16"
    assert entry["top_label_agreement"] == 1.0 and entry["labelled_images"] == 30


def test_certify_records_evidence_and_auto_reads_it(small_model, tmp_path, capsys, monkeypatch):
    from imgclf import load_model
    from imgclf.nets.engines import installed

    if not installed("openvino"):
        pytest.skip("OpenVINO is not installed")
    path = small_model.save(tmp_path / "m.imgclf")
    monkeypatch.setenv("IMGCLF_CPU_CAPABILITIES", "none")
    assert main(["certify", str(path), str(PREDICT)]) == 2  # auto -> int8, which this model has no graph for
    assert "has no calibrated int8 graph" in capsys.readouterr().err
    monkeypatch.setenv("IMGCLF_CPU_CAPABILITIES", "bf16")
    out = tmp_path / "certified.imgclf"
    assert main(["certify", str(path), str(PREDICT), str(FLOWERS / "roses"), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "bf16 on 44 images: top labels 100.0% equal to fp32" in said and "auto stays on fp32" in said
    entry = load_model(out).info["precision_metrics"]["bf16"]
    assert entry["unseen_images"] == 44 and entry["cpu"] == "bf16" and "accuracy_change" not in entry
    # the photos the head was fitted on and copies do not count (they did: the training folder
    # and a copy of it certified 400 "unseen" images of a model fitted on 160 of them)
    copies = tmp_path / "copies"
    copies.mkdir()
    for f in sorted(PREDICT.glob("*.jpg"))[:2]:
        (copies / f"copy-{f.name}").write_bytes(f.read_bytes())
    trained_on = sorted((FLOWERS / "daisy").glob("*.jpg"))[:6]  # small_model fitted on all 18 of its photos
    daisies = len(list((FLOWERS / "daisy").glob("*.jpg")))
    assert main(["certify", str(path), str(PREDICT), str(FLOWERS / "daisy"), str(copies), "--out", str(out)]) == 0
    said = capsys.readouterr()
    assert f"certify: left out {len(trained_on)} the model was trained on and 2 repeated copies of another" in said.err
    assert f"bf16 on {4 + daisies - len(trained_on)} images" in said.out
    assert main(["certify", str(path), *map(str, trained_on)]) == 2
    assert "is one the model never saw" in capsys.readouterr().err
    other = tmp_path / "other" / "orchid"  # a folder of labels the model does not have: said, not silent
    other.mkdir(parents=True)
    (other / "one.jpg").write_bytes((PREDICT / "classic-daisy.jpg").read_bytes())
    assert main(["certify", str(path), str(other.parent), "--out", str(out)]) == 0
    assert "its subfolders are not this model's labels; its images count for top-label agreement only" in \
        capsys.readouterr().err  # fmt: skip
    (other.parent / "daisy").mkdir()  # some of its labels, some not: a ValueError traceback, exit 1
    (other.parent / "daisy" / "d.jpg").write_bytes((PREDICT / "classic-tulip.jpg").read_bytes())
    assert main(["certify", str(path), str(other.parent), "--out", str(out)]) == 2
    assert "images have labels the model does not know: orchid (the model knows " in capsys.readouterr().err
    assert main(["certify", str(tmp_path / "nope.imgclf"), str(PREDICT)]) == 2
    import fsspec

    with fsspec.open("memory://certify/m.imgclf", "wb") as f:  # a model in a store is not rewritten in place
        f.write(path.read_bytes())
    capsys.readouterr()
    assert main(["certify", "memory://certify/m.imgclf", str(PREDICT)]) == 2
    assert "not rewritten in place; give --out FILE" in capsys.readouterr().err
    assert not list(tmp_path.glob("memory*")) and not Path("memory:").exists()
