"""Engines and precisions: one choice (choose_engine), parity with torch, int8 made once.

Tolerances (documented in the README, "Engines and precision"):
- fp32 on any engine: probabilities within 1e-4 of eager PyTorch.
- bf16: top labels equal to fp32, probabilities within 0.05 (bf16 keeps 8 bits of mantissa).
- int8 (static QDQ by NNCF, calibrated on the training images): top labels equal to fp32
  on all but at most one of these images, probabilities within 0.35; the same int8 graph gives
  the same probabilities (1e-4) whichever file (.imgclf or exported .onnx) carries it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from imgclf.cli import main
from imgclf.errors import ModelFileError, OptionError
from imgclf.nets.engines import (
    ACCURACY_TOLERANCE,
    COMPILE_MIN_IMAGES,
    choose_engine,
    installed,
    native_bf16,
)

from .conftest import FLOWERS, PREDICT, small_flower_folder

needs_openvino = pytest.mark.skipif(not installed("openvino"), reason="OpenVINO is not installed")
needs_bf16 = pytest.mark.skipif(
    not (installed("openvino") and native_bf16()),
    reason="this CPU has no native bf16 (no AVX-512 bf16 or AMX), so OpenVINO would run bf16 as fp32",
)


def _measured(int8_change: float = 0.0, agreement: float = 1.0) -> dict:
    return {"fp32": {"micro_accuracy": 0.9}, "int8": {"micro_accuracy": 0.9 + int8_change,
                                                      "top_label_agreement": agreement}}  # fmt: skip


def test_choose_engine_decides_by_the_table_and_the_recorded_accuracy():
    assert choose_engine().engine == "onnxruntime" and choose_engine().precision == "fp32"
    assert choose_engine(images=3).engine == "torch"  # a few images: no graph to build
    ok = choose_engine(accuracy=_measured(), int8_ready=True)
    if installed("openvino"):  # int8 runs fast on OpenVINO only
        assert (ok.engine, ok.precision) == ("openvino", "int8") and "held-out accuracy +0.0 points" in ok.reason
    moved = choose_engine(accuracy=_measured(-2 * ACCURACY_TOLERANCE), int8_ready=True)
    assert moved.precision == "fp32" and "int8 not taken: held-out accuracy -1.0 points" in moved.reason
    assert choose_engine(accuracy=_measured(agreement=0.98), int8_ready=True).precision == "fp32"
    assert choose_engine(int8_ready=True).precision == "fp32"  # never measured: not taken
    small = choose_engine(images=COMPILE_MIN_IMAGES - 1, accuracy=_measured(), int8_ready=True)
    assert (small.engine, small.precision) == ("onnxruntime", "fp32")
    assert choose_engine("torch", "auto", accuracy=_measured(), int8_ready=True).precision == "fp32"
    assert choose_engine(device="cuda").engine == "torch"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"engine": "tensorrt"}, "engine must be one of auto, onnxruntime, openvino, torch"),
        ({"precision": "fp16"}, "precision must be one of auto, fp32, bf16, int8"),
        ({"precision": "int8"}, "no calibrated int8 graph: train it with --precision int8"),
        ({"engine": "torch", "precision": "int8", "int8_ready": True}, "--engine torch runs fp32, not int8"),
        ({"engine": "torch", "onnx_file": True}, "runs on onnxruntime or openvino, not torch"),
        ({"engine": "openvino", "device": "cuda"}, "on cuda the network runs on torch in fp32"),
    ],
)
def test_impossible_combinations_are_one_line_errors(kwargs, message):
    with pytest.raises(OptionError, match=message.replace("(", r"\(")):
        choose_engine(**kwargs)


@needs_openvino
@pytest.mark.skipif(native_bf16() if installed("openvino") else True, reason="this CPU has native bf16")
def test_bf16_without_native_support_is_refused_not_faked():
    with pytest.raises(OptionError, match="has no native bf16"):
        choose_engine("openvino", "bf16")


@pytest.fixture(scope="module")
def arrays(small_model):
    from imgclf.data.imaging import load_array

    files = [
        f for label in ("daisy", "dandelion", "tulips", "roses") for f in sorted((FLOWERS / label).glob("*.jpg"))[6:9]
    ]
    return np.stack([load_array(f, small_model.preprocessing, f.name) for f in files])


@pytest.fixture(scope="module")
def model_copy(small_model, tmp_path_factory):
    """A private copy of the session's small model (calibrating it changes it)."""
    from imgclf.inference.model import load_model

    path = tmp_path_factory.mktemp("engines") / "m.imgclf"
    small_model.save(path)
    return load_model(path)


def _probs(model, engine: str, precision: str, arrays) -> tuple[np.ndarray, str]:
    choice = model.use_engine(engine, precision)
    return model.predict_proba_arrays(arrays), choice.engine


@pytest.mark.parametrize("engine", ["onnxruntime", pytest.param("openvino", marks=needs_openvino)])
def test_fp32_engines_match_torch_within_1e_4(model_copy, arrays, engine):
    reference, _ = _probs(model_copy, "torch", "fp32", arrays)
    probs, ran = _probs(model_copy, engine, "fp32", arrays)
    assert ran == engine
    assert np.abs(probs - reference).max() < 1e-4


@needs_bf16
def test_bf16_keeps_top_labels(model_copy, arrays):
    reference, _ = _probs(model_copy, "torch", "fp32", arrays)
    probs, ran = _probs(model_copy, "openvino", "bf16", arrays)
    assert ran == "openvino" and (probs.argmax(1) == reference.argmax(1)).all()
    assert np.abs(probs - reference).max() < 0.05


@pytest.fixture(scope="module")
def calibrated(model_copy, tmp_path_factory):
    """``model_copy`` calibrated for int8 on its own training images, saved and loaded back."""
    from imgclf import load_images_from_directory
    from imgclf.inference.model import load_model
    from imgclf.inference.precision import calibrate_int8

    folder = small_flower_folder(tmp_path_factory.mktemp("train"))
    graph = calibrate_int8(model_copy, load_images_from_directory(folder))
    path = tmp_path_factory.mktemp("int8") / "m.imgclf"
    model_copy.save(path)
    loaded = load_model(path)
    assert loaded.int8_graph_ == graph  # calibrated once, kept in the model file
    return loaded, path


@pytest.mark.parametrize("engine", ["onnxruntime", pytest.param("openvino", marks=needs_openvino)])
def test_int8_keeps_labels_within_the_documented_tolerance(calibrated, arrays, engine):
    model, _ = calibrated
    reference, _ = _probs(model, "torch", "fp32", arrays)
    probs, ran = _probs(model, engine, "int8", arrays)
    assert ran == engine
    assert (probs.argmax(1) != reference.argmax(1)).sum() <= 1
    assert np.abs(probs - reference).max() < 0.35
    assert np.allclose(probs.sum(1), 1, atol=1e-3)


def test_int8_export_is_the_same_graph_and_runs_torch_free(calibrated, arrays, tmp_path):
    from imgclf.inference.runtime import load_onnx_model

    model, path = calibrated
    out = tmp_path / "m-int8.onnx"
    assert main(["export", str(path), "--out", str(out), "--precision", "int8"]) == 0
    onnx_model = load_onnx_model(out, engine="onnxruntime")
    assert onnx_model.engine_choice().precision == "int8" and onnx_model.info["calibration"]["images"] == 18
    in_file, _ = _probs(model, "onnxruntime", "int8", arrays)
    assert np.abs(onnx_model.predict_proba_arrays(arrays) - in_file).max() < 1e-4
    with pytest.raises(OptionError, match="is an int8 export and runs at int8 only"):
        load_onnx_model(out, precision="fp32")


def test_held_out_metrics_per_precision_are_recorded_and_read_by_auto(calibrated, tmp_path):
    from imgclf import load_images_from_directory
    from imgclf.inference.model import load_model
    from imgclf.inference.precision import measure_precisions

    model, _ = calibrated
    held_out = load_images_from_directory(small_flower_folder(tmp_path / "held", per_class=9))[::3]
    measured = measure_precisions(model, held_out)
    assert list(measured)[:1] == ["fp32"] and "int8" in measured
    assert measured["fp32"]["images"] == len(held_out) and 0 <= measured["int8"]["top_label_agreement"] <= 1
    model.info["precision_metrics"] = measured
    model.save(tmp_path / "measured.imgclf")
    again = load_model(tmp_path / "measured.imgclf")
    assert again.info["precision_metrics"] == json.loads(json.dumps(measured))
    change = measured["int8"]["micro_accuracy"] - measured["fp32"]["micro_accuracy"]
    kept = abs(change) <= ACCURACY_TOLERANCE and measured["int8"]["top_label_agreement"] >= 0.99
    assert again.engine_choice().precision == ("int8" if kept else "fp32")


def test_precision_metrics_in_a_model_file_are_checked(calibrated, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    _, path = calibrated
    with safe_open(str(path), framework="numpy") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    config = json.loads(meta["imgclf"])
    config["precision_metrics"] = {"int8": {"micro_accuracy": 7}}
    save_file(tensors, str(tmp_path / "bad.imgclf"), metadata={"imgclf": json.dumps(config)})
    from imgclf.inference.model import load_model

    with pytest.raises(ModelFileError, match="precision_metrics.int8.micro_accuracy"):
        load_model(tmp_path / "bad.imgclf")


def test_cli_says_which_engine_runs_and_refuses_what_cannot(small_onnx_model, capsys):
    image = str(PREDICT / "classic-daisy.jpg")
    assert main(["predict", str(small_onnx_model), image, "--engine", "onnxruntime", "--precision", "fp32"]) == 0
    out, err = capsys.readouterr()
    assert "imgclf: engine onnxruntime, fp32 (asked for)" in err and "classic-daisy.jpg" in out
    assert main(["predict", str(small_onnx_model), image, "--precision", "int8"]) == 2
    assert "no calibrated int8 graph" in capsys.readouterr().err
    assert main(["predict", str(small_onnx_model), image, "--engine", "ray"]) == 2
    assert "--engine ray writes its results to files" in capsys.readouterr().err


@needs_openvino
def test_every_path_gets_the_engine_through_one_place(small_onnx_model, tmp_path):
    """predict, batch scoring and serve all load through load_predictor -> choose_engine."""
    from imgclf.batch.local import score_to_folder
    from imgclf.inference.loading import load_predictor
    from imgclf.serve import create_app

    predicted = load_predictor(small_onnx_model, engine="openvino", precision="fp32")
    assert type(predicted.session).__name__ == "OpenVinoEngine"
    files = sorted(PREDICT.glob("*.jpg"))
    out = tmp_path / "r.jsonl"
    summary = score_to_folder(small_onnx_model, [str(f) for f in files], out, engine="openvino", precision="fp32",
                              progress=False)  # fmt: skip
    rows = [json.loads(line) for part in sorted(out.glob("part-*")) for line in part.open()]
    expected = {f.name: p.label for f, p in zip(files, predicted.predict_batch(files))}
    assert summary.scored == len(files) and {r["path"].split("/")[-1]: r["label"] for r in rows} == expected
    app = create_app(small_onnx_model, engine="openvino", precision="fp32")
    assert app.state.predictor.engine_choice().engine == "openvino"


def test_torch_free_runtime_imports_openvino_only_when_it_runs(small_onnx_model):
    code = (
        "import sys; from imgclf.inference.runtime import load_onnx_model; "
        f"m = load_onnx_model({str(small_onnx_model)!r}); m.predict({str(PREDICT / 'classic-daisy.jpg')!r}); "
        "print(m.engine_choice().engine, 'openvino' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["onnxruntime", "False", "False"]
