"""Names from other systems (bytes that are not UTF-8) and links that cannot be followed:
trained on, scored, audited and reported, never a crash (issue 21, items 1 and 2)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from imgclf.cli import main

from .conftest import FLOWERS

NAME = b"caf\xe9-\xff.jpg"  # Latin-1 and a byte no encoding gives: not UTF-8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("names")
    for label in ("daisy", "tulips"):
        (root / label).mkdir()
        for f in sorted((FLOWERS / label).glob("*.jpg"))[:5]:
            shutil.copy(f, root / label / f.name)
    first = sorted((root / "daisy").iterdir())[0]
    os.rename(os.fsencode(first), os.fsencode(root / "daisy") + b"/" + NAME)
    os.symlink("loop.jpg", root / "tulips" / "loop.jpg")  # a link to itself: ELOOP when read
    return root


@pytest.fixture(scope="module")
def model(folder, tmp_path_factory, workspace):
    out = tmp_path_factory.mktemp("m") / "m.imgclf"
    assert main(["train", str(folder), "--workspace", str(workspace), "--epochs", "5", "-q", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def onnx_model(model):
    """The model exported: quick to load for the several scoring runs below."""
    out = model.with_suffix(".onnx")
    assert main(["export", str(model), "--out", str(out)]) == 0
    return out


def test_training_takes_the_name_and_skips_the_loop_with_one_line(model, capsys):
    from imgclf import load_model

    skipped = load_model(model).info["skipped"]
    assert [os.path.basename(s["file"]) for s in skipped] == ["loop.jpg"]
    assert "Too many levels of symbolic links" in skipped[0]["reason"]


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_results_keep_the_exact_name_and_resume(onnx_model, folder, tmp_path, fmt, capsys):
    from imgclf.batch.writers import read_part_paths
    from imgclf.names import from_columns

    out = tmp_path / f"r.{fmt}"
    assert main(["predict", str(onnx_model), str(folder), "--out", str(out), "-q"]) == 0
    assert "Scored 10 image(s), 1 unreadable" in capsys.readouterr().out
    parts = sorted(out.glob("part-*"))
    paths = [p for part in parts for p in read_part_paths(part, fmt)]
    exact = os.fsdecode(os.fsencode(folder / "daisy") + b"/" + NAME)
    assert exact in paths and len(paths) == 11
    if fmt == "jsonl":
        rows = [json.loads(line) for part in parts for line in part.open(encoding="utf-8")]
        row = next(r for r in rows if r["path_bytes"])
        assert row["path"].endswith("caf\\xe9-\\xff.jpg") and from_columns(row["path"], row["path_bytes"]) == exact
        loop = next(r for r in rows if r["path"].endswith("loop.jpg"))
        assert "Too many levels of symbolic links" in loop["error"] and loop["label"] is None
    assert main(["predict", str(onnx_model), str(folder), "--out", str(out), "-q"]) == 0  # nothing left to do
    assert "Scored 0 image(s), skipped 11 already in the output" in capsys.readouterr().out


def test_report_audit_and_the_terminal_show_the_name(model, folder, tmp_path, capsys, workspace):
    assert main(["report", str(model), str(folder), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "index.html").read_text(encoding="utf-8").startswith("<!doctype html>")
    assert main(["audit", str(folder), "--out", str(tmp_path / "audit"), "--workspace", str(workspace)]) == 0
    assert (tmp_path / "audit" / "index.html").is_file()
    capsys.readouterr()
    assert main(["predict", str(model), str(folder / "daisy")]) == 0
    out = capsys.readouterr().out
    assert "caf\\xe9-\\xff.jpg\tdaisy\t" in out or "caf\\xe9-\\xff.jpg\ttulips\t" in out


def test_a_report_is_never_written_into_the_training_data(model, folder, tmp_path, capsys, workspace):
    before = sorted(p.name for p in folder.rglob("*"))
    for out in (folder / "daisy", folder / "report"):
        assert main(["report", str(model), str(folder), "--out", str(out)]) == 2
        assert "is inside the image folder" in capsys.readouterr().err
    argv = ["train", str(folder), "--workspace", str(workspace), "--report", str(folder / "r"),
            "--out", str(tmp_path / "m.imgclf")]  # fmt: skip
    assert main(argv) == 2 and "--report" in capsys.readouterr().err
    assert not (tmp_path / "m.imgclf").exists()  # refused before any work
    assert sorted(p.name for p in folder.rglob("*")) == before


def test_the_audit_summary_keeps_a_name_on_one_line(tmp_path, capsys, workspace):
    """A hostile pass: names with a tab, a newline or a byte that is not UTF-8 printed raw in the
    audit's console summary (a line broken in two); they are escaped as predict escapes them."""
    from .conftest import small_flower_folder

    folder = small_flower_folder(tmp_path / "data", per_class=3, labels=("daisy", "tulips"))
    (folder / "daisy").joinpath(os.fsdecode(b"bad\tna\nme\xff.jpg")).write_bytes(b"")  # listed as unreadable
    assert main(["audit", str(folder), "--workspace", str(workspace)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "bad" in x)
    assert "bad\\tna\\nme\\xff.jpg" in line and "\t" not in out
