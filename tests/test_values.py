"""Hardening, round 2 (issue 21 item 8): values that used to be accepted silently.

Each bad value is one line naming the flag, exit code 2, before any work: no model
loaded, no image read, no results folder made. Some were already refused by the option
schema (imgclf.options) when these tests were written; they stay here as the record.
"""

from __future__ import annotations

import sys
import time

import pytest

pytest.importorskip("onnxruntime")

from imgclf.cli import main  # noqa: E402
from imgclf.errors import OptionError  # noqa: E402

from .conftest import FLOWERS, PREDICT, small_flower_folder  # noqa: E402


def refused(capsys, argv, flag: str) -> str:
    """Run ``imgclf ARGV``; assert exit 2 and one stderr line naming ``flag``, nothing on stdout."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("imgclf: error: "), err
    assert flag in lines[0], lines[0]
    assert out == ""
    return lines[0]


@pytest.mark.parametrize("argv, flag, said", [
    (["--batch-size", "0"], "--batch-size", "--batch-size must be a positive integer, got 0"),
    (["--batch-size", "-3"], "--batch-size", "--batch-size must be a positive integer, got -3"),
    (["--commit-every", "-1"], "--commit-every", "--commit-every must be a number >= 0, got -1.0"),
    (["--engine", "ray", "--workers", "0"], "--workers", "--workers must be a positive integer, got 0"),
    (["--engine", "ray", "--workers", "-2"], "--workers", "--workers must be a positive integer, got -2"),
])  # fmt: skip
def test_predict_out_refuses_bad_numbers_before_any_work(small_onnx_model, tmp_path, capsys, argv, flag, said):
    out = tmp_path / "results.parquet"
    started = time.perf_counter()
    line = refused(capsys, ["predict", small_onnx_model, PREDICT, "--out", out, *argv], flag)
    assert said in line
    assert not out.exists()  # nothing scored, no folder made
    assert time.perf_counter() - started < 10  # --engine ray: refused before Ray starts


def test_commit_every_0_commits_after_every_batch(small_onnx_model, tmp_path, capsys):
    """0 is a documented value, not a mistake: a part per batch, so a crash loses at most one batch
    (docs/scoring-at-scale.md; tests/test_batch.py stops such runs midway)."""
    images = tmp_path / "images"
    images.mkdir()
    for f in sorted(FLOWERS.rglob("*.jpg"))[:6]:
        (images / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "results.jsonl"
    code = main(["predict", str(small_onnx_model), str(images), "--out", str(out), "--batch-size", "2",
                 "--commit-every", "0", "-q"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert len(list(out.glob("part-*.jsonl"))) == 3 and (out / "_SUCCESS").exists()


@pytest.mark.parametrize("key", ["", "   "])
def test_serve_refuses_an_empty_api_key(tmp_path, capsys, monkeypatch, key):
    """An empty --api-key served with no key at all; now it is one line, before the model is read."""
    monkeypatch.delenv("IMGCLF_API_KEY", raising=False)
    line = refused(capsys, ["serve", tmp_path / "missing.imgclf", "--api-key", key], "--api-key")
    assert "model file" not in line
    monkeypatch.setenv("IMGCLF_API_KEY", key)  # the environment's key, set but empty: the same
    line = refused(capsys, ["serve", tmp_path / "missing.imgclf"], "IMGCLF_API_KEY")
    assert "model file" not in line


def test_create_app_refuses_an_empty_api_key(small_onnx_model):
    pytest.importorskip("fastapi")
    from imgclf.serve import create_app

    with pytest.raises(OptionError, match="api_key"):
        create_app(small_onnx_model, api_key="")


@pytest.fixture
def photos(tmp_path):
    return small_flower_folder(tmp_path / "photos", per_class=2, labels=("daisy", "tulips"))


def test_train_bf16_on_a_cpu_without_it_is_one_line(photos, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("IMGCLF_CPU_CAPABILITIES", "none")
    line = refused(capsys, ["train", photos, "--out", tmp_path / "m.imgclf", "--precision", "bf16"], "--precision")
    assert "no native bf16" in line and not (tmp_path / "m.imgclf").exists()


def test_train_bf16_without_openvino_is_one_line(photos, tmp_path, capsys, monkeypatch):
    """bf16 is measured on OpenVINO: without it, training used to measure nothing and say nothing."""
    monkeypatch.setenv("IMGCLF_CPU_CAPABILITIES", "bf16")
    monkeypatch.setitem(sys.modules, "openvino", None)  # not importable, as if not installed
    line = refused(capsys, ["train", photos, "--out", tmp_path / "m.imgclf", "--precision", "bf16"], "openvino")
    assert "pip install 'imgclf[openvino]'" in line and not (tmp_path / "m.imgclf").exists()


@pytest.mark.parametrize("engine, precision, runs", [
    ("onnxruntime", "bf16", "fp32, int8"),
    ("torch", "bf16", "fp32"),
    ("torch", "int8", "fp32"),
])  # fmt: skip
def test_train_refuses_an_engine_and_precision_predict_refuses(
    photos, small_onnx_model, tmp_path, capsys, monkeypatch, engine, precision, runs
):
    """What ``predict --engine E --precision P`` refuses, ``train`` refuses too, in the same words."""
    monkeypatch.setenv("IMGCLF_CPU_CAPABILITIES", "bf16,vnni")
    said = f"--engine {engine} runs {runs}, not {precision}"
    if engine != "torch":  # an exported .onnx does not run on torch at all
        assert said in refused(capsys, ["predict", small_onnx_model, PREDICT, "--engine", engine,
                                        "--precision", precision], "--engine")  # fmt: skip
    line = refused(capsys, ["train", photos, "--out", tmp_path / "m.imgclf", "--engine", engine,
                            "--precision", precision], "--engine")  # fmt: skip
    assert said in line and not (tmp_path / "m.imgclf").exists()


def test_the_trainer_refuses_them_too(monkeypatch):
    from imgclf.training.trainer import ImageClassificationTrainer

    monkeypatch.setenv("IMGCLF_CPU_CAPABILITIES", "bf16,vnni")

    with pytest.raises(OptionError, match=r"^--engine onnxruntime runs fp32, int8, not bf16"):
        ImageClassificationTrainer(engine="onnxruntime", precision="bf16").validate()
    ImageClassificationTrainer(engine="onnxruntime", precision="fp32").validate()
    ImageClassificationTrainer(engine="torch", precision="auto").validate()


def test_train_bf16_on_a_few_images_saves_the_model_and_says_why_fp32(photos, tmp_path, capsys, monkeypatch, workspace):
    """bf16 asked for on two photos per label: the certificate's folds had no image left to fit a head
    on, and a finished run ended in 'training diverged' with no model saved."""
    pytest.importorskip("openvino")
    monkeypatch.setenv("IMGCLF_CPU_CAPABILITIES", "bf16,vnni")
    out = tmp_path / "m.imgclf"
    code = main(["train", str(photos), "--out", str(out), "--precision", "bf16", "--epochs", "3", "-q",
                 "--workspace", str(workspace)])  # fmt: skip
    said = capsys.readouterr().out
    assert code == 0 and out.is_file()
    assert "Precision: fp32: bf16 measured on " in said and "too few to certify (needs 300)" in said, said
