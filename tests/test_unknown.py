"""Knowing when not to answer: the unknown-input detector fitted at training time, kept in the
model file, and said by every prediction (``known``, ``unknown_score``). Real images only:
MRI slices (tests/data/brain-mri) are far from the flower photos the small model learned."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from imgclf import ModelFileError, load_model  # noqa: E402
from imgclf.cli import main  # noqa: E402
from imgclf.inference.unknown import fit_detector, knn_scores, normalised, stratified_folds  # noqa: E402

from .conftest import FLOWERS, PREDICT  # noqa: E402

MRI = Path(__file__).parent / "data" / "brain-mri"
SANITY = Path(__file__).parent / "data" / "imagenet-sanity"


def _cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def test_the_threshold_is_placed_on_cross_fitted_scores():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 32))
    y = np.repeat(np.arange(3), 40)
    x = np.abs(centres[y] + 0.3 * rng.normal(size=(120, 32))).astype(np.float32)
    detector = fit_detector(x, y, 0.1)
    assert detector.measured["images_measured"] == 120 and detector.measured["folds"] == 5
    assert detector.measured["cross_fitted_rejected"] == pytest.approx(0.1, abs=0.01)
    # scored against a bank that holds it, a training vector is at distance 0 from itself: the cross-fit is
    # what keeps the threshold honest
    assert knn_scores(normalised(x), x[:1], 1)[0] == pytest.approx(0.0, abs=1e-6)
    far = np.abs(rng.normal(size=(20, 32)) * 5).astype(np.float32)
    assert detector.known(detector.score(far)).mean() < detector.known(detector.score(x)).mean()
    assert sorted(np.concatenate(stratified_folds(y, 5, 1)).tolist()) == list(range(120))


def test_the_small_model_knows_flowers_and_not_mri_slices(small_model):
    detector = small_model.unknown_
    assert detector is not None and detector.config()["method"] == "knn-cosine"
    assert detector.rejection_rate == 0.05 and detector.measured["features"] == "pretrained backbone"
    mri = small_model.predict_batch(MRI)
    assert all(p.known is False for p in mri) and all(p.label in small_model.labels for p in mri)  # still labelled
    flowers = small_model.predict_batch([PREDICT / "classic-daisy.jpg", PREDICT / "classic-tulip.jpg"])
    assert all(p.known is True for p in flowers)
    assert min(p.unknown_score for p in mri) > detector.threshold >= max(p.unknown_score for p in flowers)
    assert "known=False" in repr(mri[0])


def test_the_detector_travels_in_the_model_file(small_model, small_model_file):
    loaded = load_model(small_model_file)
    assert loaded.unknown_.threshold == small_model.unknown_.threshold
    assert np.array_equal(loaded.unknown_.bank, small_model.unknown_.bank)
    one, two = small_model.predict(MRI / "glioma" / "Te-glTr_0003.jpg"), loaded.predict(MRI / "glioma" / "Te-glTr_0003.jpg")
    assert one.unknown_score == pytest.approx(two.unknown_score, abs=1e-6) and one.known is two.known is False


def _without_detector(path: Path, dest: Path) -> Path:
    """The model file as imgclf wrote it before the detector existed."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="numpy") as f:
        config = json.loads(f.metadata()["imgclf"])
    del config["unknown"]
    tensors = {k: v for k, v in load_file(str(path)).items() if k != "unknown.bank"}
    save_file(tensors, str(dest), metadata={"imgclf": json.dumps(config)})
    return dest


def test_an_old_model_file_keeps_working_and_says_so_once(small_model_file, tmp_path):
    old = _without_detector(small_model_file, tmp_path / "old.imgclf")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(old)
        predictions = model.predict_batch(MRI)
    said = [str(w.message) for w in caught if "unknown-input detector" in str(w.message)]
    assert len(said) == 1 and "known: null" in said[0]
    assert all(p.known is None and p.unknown_score is None for p in predictions)
    assert "known" not in predictions[0].to_dict()
    code, out, err = _cli("predict", old, MRI / "glioma")
    assert code == 0 and err.count("unknown-input detector") == 1 and out.splitlines()[0].endswith("\t-")
    code, out, err = _cli("predict", old, MRI / "glioma", "--reject-unknown")
    assert code == 2 and out == "" and err.strip().splitlines()[-1].startswith("imgclf: error: --reject-unknown:")


def test_a_bank_that_does_not_fit_its_metadata_is_refused(small_model_file, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(small_model_file), framework="numpy") as f:
        meta = f.metadata()
    tensors = load_file(str(small_model_file))
    tensors["unknown.bank"] = tensors["unknown.bank"][:-1].contiguous()
    save_file(tensors, str(tmp_path / "cut.imgclf"), metadata=meta)
    with pytest.raises(ModelFileError, match="unknown-input detector's bank"):
        load_model(tmp_path / "cut.imgclf")


def test_reject_unknown_in_predict_and_evaluate(small_model_file, tmp_path):
    code, out, _ = _cli("predict", small_model_file, MRI / "glioma", PREDICT / "classic-daisy.jpg", "--reject-unknown")
    lines = [line.split("\t") for line in out.splitlines()]
    assert code == 0 and [(r[1], r[3]) for r in lines] == [("unknown", "unknown")] * 2 + [("daisy", "known")]
    code, out, _ = _cli("predict", small_model_file, MRI / "glioma", "--reject-unknown", "--json")
    assert {(r["label"], r["known"]) for r in json.loads(out)} == {("unknown", False)}
    assert _cli("predict", small_model_file, MRI, "--reject-unknown", "--out", tmp_path / "r.csv")[0] == 2

    folder = tmp_path / "labelled"  # two labels the model knows, with two MRI slices filed under daisy
    for label in ("daisy", "tulips"):
        (folder / label).mkdir(parents=True)
        for f in sorted((FLOWERS / label).glob("*.jpg"))[-4:]:
            (folder / label / f.name).write_bytes(f.read_bytes())
    for f in sorted((MRI / "glioma").glob("*.jpg")):
        (folder / "daisy" / f.name).write_bytes(f.read_bytes())
    code, out, _ = _cli("evaluate", small_model_file, folder, "--reject-unknown", "--json")
    said = json.loads(out)["unknown"]
    assert code == 0 and said["rejected_images"] >= 2 and said["rejected"] == pytest.approx(said["rejected_images"] / 10)
    code, out, _ = _cli("evaluate", small_model_file, folder, "--reject-unknown")
    assert "rejected as unknown" in out
    code, out, _ = _cli("evaluate", small_model_file, folder, "--json")
    assert "unknown" not in json.loads(out)


def test_the_exported_graph_scores_unknown_inputs_itself(small_onnx_model):
    import onnx

    graph = onnx.load(str(small_onnx_model))
    assert [o.name for o in graph.graph.output] == ["probabilities", "unknown_score", "class_maps"]  # maps: explain
    config = json.loads({p.key: p.value for p in graph.metadata_props}["imgclf"])
    assert config["unknown"]["method"] == "knn-cosine" and 0 < config["unknown"]["threshold"] < 2
    exported = load_model(small_onnx_model)
    assert all(p.known is False for p in exported.predict_batch(MRI))


def test_the_rejection_rate_is_an_option_checked_once():
    from imgclf import ImageClassificationTrainer
    from imgclf.errors import OptionError

    for bad in (0, 0.6, -0.1, "5%"):
        with pytest.raises(OptionError, match="unknown_rate"):
            ImageClassificationTrainer(unknown_rate=bad).validate()
    code, _, err = _cli("train", "--unknown-rate", "0.9")
    assert code == 2 and "--unknown-rate" in err
