"""Engines and precisions: one choice (choose_engine), parity with torch, int8 made once.

Every choice is tested both ways on any machine: ``IMGCLF_CPU_CAPABILITIES`` (read in
one place, imgclf.nets.cpu) pretends a CPU has or lacks native bf16 / VNNI.

Tolerances (docs, "Engines and precision"):
- fp32 on any engine: probabilities within 1e-4 of eager PyTorch (measured 2e-6).
- bf16 (only on a CPU with native bf16): top labels equal to fp32, probabilities within 0.05
  (measured 0.021, no flip, on an AMD Zen 5 with AVX-512 bf16 and on an Intel Xeon with AMX).
- int8 (static QDQ by NNCF, calibrated on the training images): on these 12 images probabilities
  within 0.1 of fp32 and at most one top label flipped, only where fp32's two best nearly tie
  (measured: ONNX Runtime 0.020, no flip; OpenVINO 0.031 and no flip on an AVX-512 VNNI CPU,
  0.073 and one flip on an image scored 0.44 on an AVX2-only Zen 3; ONNX Runtime 0.016 and
  OpenVINO 0.031, no flip, on an AVX-512 bf16/VNNI Zen 5; 0.017 and 0.017, no flip, on an
  Intel Xeon with AMX); the same int8 graph gives the same
  probabilities (1e-4) whichever file (.imgclf or exported .onnx) carries it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from imgclf.cli import main
from imgclf.errors import ModelFileError, OptionError
from imgclf.nets.cpu import cpu_capabilities
from imgclf.nets.engines import choose_engine, installed

from .conftest import FLOWERS, PREDICT, small_flower_folder

needs_openvino = pytest.mark.skipif(not installed("openvino"), reason="OpenVINO is not installed")
NATIVE_BF16 = cpu_capabilities().bf16 if "IMGCLF_CPU_CAPABILITIES" not in os.environ else False
needs_bf16 = pytest.mark.skipif(
    not (installed("openvino") and NATIVE_BF16),
    reason="this CPU has no native bf16 (no AVX-512 bf16 or AMX), so OpenVINO would run bf16 as fp32; "
    "the choice itself is tested both ways with IMGCLF_CPU_CAPABILITIES",
)


@pytest.fixture(params=["none", "bf16,vnni"], ids=["avx2-like", "bf16-vnni-like"])
def cpu(request, monkeypatch):
    """Run the test as on a CPU without, then with, native bf16 and VNNI."""
    monkeypatch.setenv("IMGCLF_CPU_CAPABILITIES", request.param)
    return cpu_capabilities()


def _certificate(agreement=1.0, unseen=300, change=0.0, cpu="bf16+vnni") -> dict:
    """A certificate as training or ``imgclf certify`` records it (the thresholds are the docs': 300
    unseen images, 99% of top labels equal to fp32, accuracy within 0.5 point)."""
    return {"top_label_agreement": agreement, "images": unseen, "unseen_images": unseen,
            "accuracy_change": change, "cpu": cpu}  # fmt: skip


def _metrics(**certificates) -> dict:
    return {"fp32": {"micro_accuracy": 0.9}, **certificates}


def test_the_capability_override_is_read_in_one_place(monkeypatch):
    monkeypatch.setenv("IMGCLF_CPU_CAPABILITIES", "bf16,vnni")
    assert (cpu_capabilities().bf16, cpu_capabilities().vnni, cpu_capabilities().key) == (True, True, "bf16+vnni")
    monkeypatch.setenv("IMGCLF_CPU_CAPABILITIES", "none")
    assert cpu_capabilities().key == "none" and cpu_capabilities().source == "IMGCLF_CPU_CAPABILITIES"
    monkeypatch.setenv("IMGCLF_CPU_CAPABILITIES", "avx9000")
    with pytest.raises(OptionError, match="IMGCLF_CPU_CAPABILITIES='avx9000': use a comma-separated list"):
        cpu_capabilities()
    monkeypatch.setenv("IMGCLF_CPU_CAPABILITIES", " ")  # set but empty is unset (it silently meant none)
    real = cpu_capabilities()
    monkeypatch.delenv("IMGCLF_CPU_CAPABILITIES")
    assert real == cpu_capabilities() and real.source != "IMGCLF_CPU_CAPABILITIES"


def test_fp32_engines_by_job_size_never_change_the_precision(cpu):
    """Job size may pick between engines of one precision, never between precisions."""
    certified = _metrics(bf16=_certificate(), int8=_certificate())
    precisions = {choose_engine(images=n, accuracy=certified, int8_ready=True).precision for n in (1, 4, 300, 1800)}
    assert len(precisions) == 1
    plain = [choose_engine(images=n) for n in (1, 4, 7, 8, 300, 1800, None)]
    assert {c.precision for c in plain} == {"fp32"}
    assert [c.engine for c in plain] == ["torch"] * 3 + ["onnxruntime"] * 4
    assert {choose_engine(images=n, onnx_file=True).engine for n in (1, 4, 1800)} == {"onnxruntime"}
    assert choose_engine(device="cuda").engine == "torch"


@needs_openvino
def test_auto_takes_certified_bf16_first_only_on_a_cpu_with_native_bf16(cpu):
    certified = _metrics(bf16=_certificate(), int8=_certificate(cpu=cpu.key))
    choice = choose_engine(accuracy=certified, int8_ready=True, images=1)
    if cpu.bf16:
        assert (choice.engine, choice.precision, choice.cpu) == ("openvino", "bf16", "bf16+vnni")
        assert "certified: top labels 100.0% equal to fp32 on 300 unseen images" in choice.reason
    else:  # int8 is next; bf16 is never chosen where it would run as fp32
        assert (choice.engine, choice.precision, choice.cpu) == ("openvino", "int8", "none")
        assert "no native bf16" in choice.reason
    onnx = choose_engine(accuracy=certified, int8_ready=True, onnx_file=True)
    assert onnx.precision == ("bf16" if cpu.bf16 else "int8")


@needs_openvino
@pytest.mark.parametrize(
    "certificate, why",
    [
        (None, "bf16 not certified for this model"),
        (_certificate(unseen=299), "bf16 measured on 299 images the head did not see (299 in all): too few"),
        (_certificate(agreement=0.985), "bf16 not taken: top labels 98.5% equal to fp32 on 300 unseen images"),
        (_certificate(change=-0.01), "accuracy -1.0 points (needs within 0.5)"),
        (_certificate(cpu="none"), "bf16 was not measured on a CPU with native bf16"),
        ({"micro_accuracy": 0.9, "top_label_agreement": 1.0, "images": 40},  # a model made before certificates
         "bf16 measured on 0 images the head did not see (40 in all): too few"),
    ],
)
def test_auto_stays_on_fp32_without_enough_evidence_and_says_why(monkeypatch, certificate, why):
    monkeypatch.setenv("IMGCLF_CPU_CAPABILITIES", "bf16")
    metrics = _metrics(**({"bf16": certificate} if certificate else {}))
    choice = choose_engine(accuracy=metrics, images=2000)
    assert (choice.engine, choice.precision) == ("onnxruntime", "fp32") and why in choice.reason


@needs_openvino
def test_int8_certified_on_a_cpu_of_the_other_vnni_kind_is_not_taken(monkeypatch):
    monkeypatch.setenv("IMGCLF_CPU_CAPABILITIES", "none")
    measured_with_vnni = _metrics(int8=_certificate(cpu="vnni"))
    choice = choose_engine(accuracy=measured_with_vnni, int8_ready=True)
    assert choice.precision == "fp32" and "int8 was measured on a CPU with VNNI" in choice.reason
    monkeypatch.setenv("IMGCLF_CPU_CAPABILITIES", "vnni")
    assert choose_engine(accuracy=measured_with_vnni, int8_ready=True).precision == "int8"


def test_explicit_bf16_is_refused_without_native_bf16_and_taken_with_it(monkeypatch):
    monkeypatch.setenv("IMGCLF_CPU_CAPABILITIES", "vnni")
    with pytest.raises(OptionError, match="has no native bf16"):
        choose_engine("openvino", "bf16")
    if installed("openvino"):
        monkeypatch.setenv("IMGCLF_CPU_CAPABILITIES", "bf16")
        assert choose_engine("auto", "bf16").engine == "openvino"


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


@needs_openvino
def test_bf16_gives_the_file_and_its_export_the_same_answer(model_copy, arrays, tmp_path, monkeypatch):
    """At bf16 the rounding follows the graph: the .imgclf ran its backbone's graph and the head in
    numpy, the .onnx its whole graph, and on a CPU with native bf16 (AMD Zen 5) they differed by
    2e-3 where the rule is 1e-4. Both now run the exported graph: measured 0 there. (Without
    native bf16 OpenVINO computes in fp32, so only such a CPU can tell the two apart.)"""
    from imgclf.inference.runtime import load_onnx_model

    monkeypatch.setenv("IMGCLF_CPU_CAPABILITIES", "bf16,vnni")
    out = tmp_path / "m.onnx"
    model_copy.export_onnx(out)
    in_file, ran = _probs(model_copy, "openvino", "bf16", arrays)
    exported = load_onnx_model(out, engine="openvino", precision="bf16")
    assert ran == "openvino" and exported.engine_choice().precision == "bf16"
    assert np.abs(exported.predict_proba_arrays(arrays) - in_file).max() < 1e-4


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
    flipped = probs.argmax(1) != reference.argmax(1)
    top2 = np.sort(reference, axis=1)[:, -2:]
    assert (top2[flipped, 1] - top2[flipped, 0] < 0.1).all()  # a flip only where fp32 itself nearly ties
    assert flipped.sum() <= 1
    assert np.abs(probs - reference).max() < 0.1
    assert np.allclose(probs.sum(1), 1, atol=1e-3)


def test_int8_export_is_the_same_graph_and_runs_torch_free(calibrated, arrays, tmp_path):
    from imgclf.inference.runtime import load_onnx_model

    model, path = calibrated
    out = tmp_path / "m-int8.onnx"
    assert main(["export", str(path), "--out", str(out), "--precision", "int8"]) == 0
    onnx_model = load_onnx_model(out, engine="onnxruntime")
    assert onnx_model.engine_choice().precision == "int8" and onnx_model.info["calibration"]["images"] == 18
    from imgclf.nets.cpu import cpu_capabilities

    # what ran names the CPU, as for every other file: it said "" and a resumed --out refused to go on
    assert onnx_model.engine_choice().to_dict()["cpu"] == cpu_capabilities().key != ""
    in_file, _ = _probs(model, "onnxruntime", "int8", arrays)
    assert np.abs(onnx_model.predict_proba_arrays(arrays) - in_file).max() < 1e-4
    with pytest.raises(OptionError, match="is an int8 export and runs at int8 only"):
        load_onnx_model(out, precision="fp32")


def test_measured_certificates_are_recorded_and_read_by_auto(calibrated, tmp_path, monkeypatch):
    from imgclf import load_images_from_directory
    from imgclf.inference.model import load_model
    from imgclf.inference.precision import measure_precisions, record_certificate

    monkeypatch.setenv("IMGCLF_CPU_CAPABILITIES", "none")
    model, _ = calibrated
    held_out = load_images_from_directory(small_flower_folder(tmp_path / "held", per_class=9))[::3]
    measured = measure_precisions(model, held_out, ["fp32", "int8"])
    entry = measured["int8"]
    assert measured["fp32"]["images"] == len(held_out) == entry["images"] == entry["unseen_images"] == 9
    assert entry["cpu"] == "none" and entry["labelled_images"] == 9 and entry["top_label_agreement"] == 1.0
    record_certificate(model, "int8", entry)
    model.save(tmp_path / "measured.imgclf")
    again = load_model(tmp_path / "measured.imgclf")
    assert again.info["precision_metrics"]["int8"] == json.loads(json.dumps(entry))
    choice = again.engine_choice()  # 9 images cannot certify: fp32, and it says why
    assert choice.precision == "fp32" and "int8 measured on 9 images the head did not see" in choice.reason
    unlabelled = measure_precisions(model, [im.__class__(im.source, None, im.name) for im in held_out], ["int8"])
    assert "accuracy_change" not in unlabelled["int8"] and unlabelled["int8"]["images"] == 9


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
    # the fix is another export, not another training (it said "train it with --precision int8")
    assert "not an int8 export: export the .imgclf model (trained with --precision int8) again" in \
        capsys.readouterr().err  # fmt: skip
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
    for caps in ("none", "bf16,vnni"):  # a bf16 CPU, too: nothing certified, so nothing else is imported
        env = {**os.environ, "IMGCLF_CPU_CAPABILITIES": caps}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["onnxruntime", "False", "False"], caps
