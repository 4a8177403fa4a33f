"""Local batch scoring (`imgclf predict --out`): agrees with plain predict, streams
from manifests and URIs, survives being killed, refuses bad output and model paths."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from imgclf.cli import main  # noqa: E402

from .conftest import (  # noqa: E402
    CORRUPT,
    FLOWERS,
    PREDICT,
    assert_agrees_with_predict_json,
    ctrl_c_as_in_a_terminal,
    predict_json,
    scoring_folder,
)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def read_rows(out: Path) -> list[dict]:
    """Every row of a results folder, whatever its format (lists decoded from CSV)."""
    if out.suffix == ".parquet":
        return pq.read_table(out).to_pylist()
    rows = []
    for part in sorted(out.glob("part-*")):
        if out.suffix == ".csv":
            with open(part, newline="") as f:
                for r in csv.DictReader(f):
                    rows.append({k: (None if v == "" else v) for k, v in r.items()})
            for r in rows:
                for k in ("probability", "unknown_score"):
                    r[k] = None if r[k] is None else float(r[k])
                r["known"] = {None: None, "true": True, "false": False, True: True, False: False}[r["known"]]
                for k in ("top_labels", "top_probabilities"):
                    r[k] = None if r[k] is None else json.loads(r[k]) if isinstance(r[k], str) else r[k]
        else:
            rows += [json.loads(line) for line in part.read_text().splitlines()]
    return rows


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return scoring_folder(tmp_path_factory.mktemp("batch") / "images")


@pytest.fixture(scope="module")
def expected(small_onnx_model, folder) -> dict[str, dict]:
    return predict_json(small_onnx_model, folder)


def test_parquet_agrees_with_predict_json(small_onnx_model, folder, expected, tmp_path, capsys):
    out = tmp_path / "results.parquet"
    code, stdout, err = run(capsys, "predict", small_onnx_model, folder, "--out", out, "--top-k", 2, "-q")
    assert code == 0, err
    assert "Scored 8 image(s), 3 unreadable (error rows)" in stdout
    table = pq.read_table(out)
    rows = table.to_pylist()
    assert_agrees_with_predict_json(rows, expected)
    assert {Path(r["path"]).name for r in rows if r["error"]} == CORRUPT
    for r in rows:
        if r["error"] is None:
            assert r["top_labels"][0] == r["label"] and len(r["top_labels"]) == 2
            assert r["top_probabilities"] == sorted(r["top_probabilities"], reverse=True)
            assert r["top_probabilities"][0] == pytest.approx(r["probability"])
    meta = json.loads(table.schema.metadata[b"imgclf"])
    assert meta["model_sha256"] == hashlib.sha256(small_onnx_model.read_bytes()).hexdigest()
    assert meta["labels"] == ["daisy", "dandelion", "tulips"] and meta["top_k"] == 2
    # the same run again finds everything done and leaves the rows as they were
    code, stdout, _ = run(capsys, "predict", small_onnx_model, folder, "--out", out, "--top-k", 2, "-q")
    assert code == 0 and "Scored 0 image(s), skipped 11 already in the output" in stdout
    assert pq.read_table(out).to_pylist() == rows


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_csv_and_jsonl_hold_the_same_rows(small_onnx_model, folder, expected, tmp_path, capsys, suffix):
    out = tmp_path / f"results{suffix}"
    code, _, err = run(capsys, "predict", small_onnx_model, folder, "--out", out, "--top-k", 2, "-q")
    assert code == 0, err
    rows = read_rows(out)
    assert_agrees_with_predict_json(rows, expected)
    sidecar = json.loads((out / "_imgclf.json").read_text())
    assert sidecar["model_sha256"] == hashlib.sha256(small_onnx_model.read_bytes()).hexdigest()
    assert sidecar["labels"] == ["daisy", "dandelion", "tulips"] and sidecar["file_format"] == suffix[1:]


def test_manifests_and_globs_stream_paths(small_onnx_model, folder, tmp_path, capsys):
    images = sorted(p for p in folder.rglob("*") if p.is_file())
    lists = tmp_path / "lists"
    lists.mkdir()
    # a .txt with relative entries (joined to its folder), a comment and a blank line
    rel = [os.path.relpath(p, lists) for p in images[:3]]
    (lists / "some.txt").write_text("# chosen by hand\n" + "\n".join(rel) + "\n\n")
    with open(lists / "more.csv", "w", newline="") as f:
        csv.writer(f).writerows([["id", "path"], *[[i, str(p)] for i, p in enumerate(images[3:6])]])
    pq.write_table(pa.table({"path": [str(p) for p in images[6:8]], "label": ["x", "y"]}), lists / "rest.parquet")
    out = tmp_path / "results.parquet"
    code, _, err = run(capsys, "predict", small_onnx_model, lists / "some.txt", lists / "more.csv",
                       lists / "rest.parquet", f"{folder}/nested/**/*.jpg", "--out", out, "-q")  # fmt: skip
    assert code == 0, err
    paths = [r["path"] for r in pq.read_table(out).to_pylist()]
    nested = sorted(str(p) for p in (folder / "nested").rglob("*.jpg"))
    assert paths == [str(Path(lists, r)) for r in rel] + [str(p) for p in images[3:8]] + nested
    assert all(Path(p).is_file() for p in paths)


def test_out_finds_the_images_plain_predict_finds(small_onnx_model, tmp_path, capsys):
    """--out (and Ray) scored hidden files (.hidden.jpg, macOS's ._photo.jpg, .ipynb_checkpoints)
    and tool folders (__MACOSX) that plain predict skips, and skipped linked folders it follows."""
    import shutil

    from imgclf.batch.sources import classify_inputs, iter_image_paths
    from imgclf.data.images import find_image_files

    root = tmp_path / "photos"
    for where in ("a", "b/c", ".ipynb_checkpoints", "__MACOSX", "elsewhere"):
        (root / where).mkdir(parents=True)
    for name in ("a/x.jpg", "b/c/y.jpg", ".hidden.jpg", "a/._x.jpg", ".ipynb_checkpoints/z.jpg", "__MACOSX/w.jpg",
                 "elsewhere/v.jpg", "top.jpg"):  # fmt: skip
        shutil.copy(PREDICT / "classic-daisy.jpg", root / name)
    os.symlink(root / "elsewhere", root / "b" / "linked")  # a link to a folder: followed, as plain predict does
    os.symlink(root, root / "a" / "loop")  # back to the top: each real folder once
    os.symlink(root / "gone.jpg", root / "b" / "broken.jpg")  # listed by both, and an error row where read
    plain = [str(p) for p in find_image_files([root])]
    streamed = list(iter_image_paths(classify_inputs([str(root)])))
    assert sorted(streamed) == sorted(plain) and len(plain) == 5, (streamed, plain)  # v.jpg once
    assert not any("/." in p or "__MACOSX" in p for p in streamed)
    code, _, err = run(capsys, "predict", small_onnx_model, root, "--out", tmp_path / "r.csv", "-q")
    assert code == 0, err
    assert sorted(r["path"] for r in read_rows(tmp_path / "r.csv")) == sorted(plain)


def test_fsspec_uris_are_read(small_onnx_model, folder, tmp_path):
    fsspec = pytest.importorskip("fsspec")
    from imgclf.batch.local import score_to_folder

    fs = fsspec.filesystem("memory")
    for f in [*sorted(PREDICT.glob("*.jpg")), folder / "truncated.jpg"]:
        fs.pipe(f"/scoring/{f.name}", f.read_bytes())
    fs.pipe("/lists/extra.jpg", (PREDICT / "classic-daisy.jpg").read_bytes())
    fs.pipe("/lists/one.txt", b"extra.jpg\nmemory://scoring/missing.jpg\n")
    out = tmp_path / "results.jsonl"
    summary = score_to_folder(small_onnx_model, ["memory://scoring", "memory://lists/one.txt"], out, progress=False)
    rows = {r["path"]: r for r in read_rows(out)}
    assert list(rows) == ["memory://scoring/classic-daisy.jpg", "memory://scoring/classic-tulip.jpg",
                          "memory://scoring/truncated.jpg", "memory://lists/extra.jpg", "memory://scoring/missing.jpg"]  # fmt: skip
    daisy = rows["memory://scoring/classic-daisy.jpg"]
    assert daisy["label"] == "daisy" and rows["memory://lists/extra.jpg"]["probability"] == daisy["probability"]
    assert "cannot read file" in rows["memory://scoring/missing.jpg"]["error"]
    assert "corrupt or truncated" in rows["memory://scoring/truncated.jpg"]["error"]
    assert (summary.scored, summary.failed) == (3, 2)


def test_a_file_uri_is_percent_decoded_when_read_as_when_written(small_onnx_model, workspace, tmp_path):
    """`Path.as_uri()` of a name with a space or an accent (file:///.../with%20space%20%C3%A9.jpg)
    was read as the name with "%20" in it: "No such file" when scoring and training, while
    `--out file:///...` was decoded. Scored, trained on and listed from a folder URI alike."""
    pytest.importorskip("fsspec")
    import shutil

    from imgclf.batch.local import score_to_folder
    from imgclf.data.layouts import load_dataset

    folder = tmp_path / "with space é"
    folder.mkdir()
    photo = folder / "a b.jpg"
    shutil.copy(PREDICT / "classic-daisy.jpg", photo)
    (tmp_path / "list.txt").write_text(photo.as_uri() + "\n")
    out = tmp_path / "r.jsonl"
    score_to_folder(small_onnx_model, [str(tmp_path / "list.txt"), folder.as_uri()], out, progress=False)
    rows = read_rows(out)
    assert len(rows) == 2 and all(r["error"] is None and r["label"] == "daisy" for r in rows), rows
    other = PREDICT / "classic-tulip.jpg"
    (tmp_path / "m.csv").write_text(f"path,label\n{photo.as_uri()},x\n{other.as_uri()},y\n")
    images = load_dataset(tmp_path / "m.csv").train
    assert sorted(im.read_bytes() for im in images) == sorted([photo.read_bytes(), other.read_bytes()])


def _rows_committed(out: Path) -> int:
    parts = list(out.glob("part-*.parquet")) if out.is_dir() else []
    return sum(pq.ParquetFile(p).metadata.num_rows for p in parts)


def _stop_midway(cmd: list[str], out: Path, how: signal.Signals) -> subprocess.CompletedProcess:
    """Start ``cmd``, wait until it has committed rows beyond those already there, then send ``how``."""
    before = _rows_committed(out)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=ctrl_c_as_in_a_terminal)  # fmt: skip
    deadline = time.monotonic() + 60
    while _rows_committed(out) < before + 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(how)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def test_stopped_midway_then_rerun_scores_each_input_once(small_onnx_model, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for f in sorted(FLOWERS.rglob("*.jpg"))[::5]:  # 40 photos, all five labels
        (images / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "results.parquet"
    cmd = [sys.executable, "-m", "imgclf.cli", "predict", str(small_onnx_model), str(images), "--out", str(out),
           "--batch-size", "2", "--commit-every", "0", "-q"]  # fmt: skip
    seen = 0
    for how in (signal.SIGINT, signal.SIGKILL):  # Ctrl-C, then a kill nothing can catch
        stopped = _stop_midway(cmd, out, how)
        if how == signal.SIGINT:
            assert stopped.returncode == 130 and "run the same command again" in stopped.stderr, stopped.stderr
        else:
            assert stopped.returncode == -signal.SIGKILL
        rows = pq.read_table(out).to_pylist()  # readable however the run ended
        assert seen < len(rows) < 40, "the run was not stopped midway"
        assert len({r["path"] for r in rows}) == len(rows)
        assert not (out / "_SUCCESS").exists() and "rows" not in json.loads((out / "_imgclf.json").read_text())
        seen = len(rows)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"Scored {40 - seen} image(s), skipped {seen} already in the output" in done.stdout
    paths = [r["path"] for r in pq.read_table(out).to_pylist()]
    assert sorted(paths) == sorted(str(p) for p in images.iterdir())  # every input exactly once
    assert not list(out.glob(".*.inprogress"))
    meta = json.loads((out / "_imgclf.json").read_text())  # finished: the marker and the counts
    assert (out / "_SUCCESS").is_file() and meta["rows"] == 40 and meta["error_rows"] == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{model}", "{images}", "--out", "{tmp}/r.xlsx"], "unknown results format '.xlsx'"),
        (["{model}", "{images}", "--out", "{tmp}/file.parquet"], "exists and is a file"),
        (["{model}", "{images}", "--out", "{tmp}/other"], "end it in .parquet, .csv or .jsonl"),
        (["{tmp}/missing.onnx", "{images}", "--out", "{tmp}/r.parquet"], "model file not found"),
        (["{tmp}/bad.onnx", "{images}", "--out", "{tmp}/r.parquet"], "not a readable ONNX model"),
        (["{model}", "{tmp}/nothing", "--out", "{tmp}/r.parquet"], "no such file or folder"),
        (["{model}", "{tmp}/*.nothing", "--out", "{tmp}/r.parquet"], "matches no files"),
        (["{model}", "{tmp}/nopath.csv", "--out", "{tmp}/r.parquet"], "no 'path' column"),
        (["{model}", "{images}", "--out", "{tmp}/r.parquet", "--top-k", "0"], "--top-k must be a positive integer"),
        (["{model}", "{images}", "--out", "{tmp}/r.parquet", "--workers", "2"], "--workers only applies with --engine ray"),
        (["{model}", "{images}", "--out", "{tmp}/r.parquet", "--json"], "leave one of them out"),
        (["{model}", "{images}", "--engine", "ray"], "add --out results.parquet"),
        (["{model}", "{images}", "--commit-every", "1"], "--commit-every only applies with --out"),
        (["{model}", "{images}", "--out", "{tmp}/notours.parquet"], "does not hold imgclf results"),
    ],
)
def test_model_and_output_problems_stop_before_any_work(small_onnx_model, folder, tmp_path, capsys, argv, message):
    (tmp_path / "file.parquet").write_text("I was here first")
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    (tmp_path / "nopath.csv").write_text("name,label\na.jpg,x\n")  # "file" would be a path column
    (tmp_path / "notours.parquet").mkdir()
    (tmp_path / "notours.parquet" / "data.bin").write_text("keep me")
    before = sorted(p.name for p in tmp_path.iterdir())
    fill = {"model": small_onnx_model, "images": folder, "tmp": tmp_path}
    code, out, err = run(capsys, "predict", *[a.format(**fill) for a in argv])
    assert code == 2 and out == ""
    assert err.startswith("imgclf: error: ") and err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_resuming_with_another_model_or_top_k_is_refused(small_onnx_model, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    image = PREDICT / "classic-daisy.jpg"
    assert run(capsys, "predict", small_onnx_model, image, "--out", out, "-q")[0] == 0
    code, _, err = run(capsys, "predict", small_onnx_model, image, "--out", out, "--top-k", 3, "-q")
    assert code == 2 and "holds top-1 results; run again with --top-k 1" in err
    onnx = pytest.importorskip("onnx")
    graph = onnx.load(str(small_onnx_model))
    graph.doc_string = "another model"
    other = tmp_path / "other.onnx"
    onnx.save(graph, str(other))
    code, _, err = run(capsys, "predict", other, image, "--out", out, "-q")
    assert code == 2 and "holds results of another model (small.onnx" in err


def test_a_second_run_on_the_same_output_is_refused(small_onnx_model, tmp_path, capsys):
    pytest.importorskip("fcntl")
    from imgclf.batch.writers import ResultFolder

    out = tmp_path / "r.parquet"
    image = PREDICT / "classic-daisy.jpg"
    assert run(capsys, "predict", small_onnx_model, image, "--out", out, "-q")[0] == 0
    metadata = json.loads((out / "_imgclf.json").read_text())
    with ResultFolder(out, metadata):
        code, _, err = run(capsys, "predict", small_onnx_model, image, "--out", out, "-q")
    assert code == 2 and "another imgclf run is writing there" in err


def test_engine_ray_without_ray_names_the_extra(small_onnx_model, folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    monkeypatch.delitem(sys.modules, "imgclf.batch.ray", raising=False)
    code, _, err = run(capsys, "predict", small_onnx_model, folder, "--engine", "ray", "--out", tmp_path / "r.parquet")
    assert code == 2 and "pip install 'imgclf[ray]'" in err and err.count("\n") == 1
    assert not (tmp_path / "r.parquet").exists()


def test_a_remote_glob_that_cannot_be_listed_is_one_line(monkeypatch):
    """An s3:// glob without credentials was botocore's NoCredentialsError traceback, exit 1
    (a single s3:// file, model or --out was one line already)."""
    from imgclf.batch import sources
    from imgclf.errors import DataError

    class NoCredentials:
        def glob(self, path):
            raise RuntimeError("Unable to locate credentials")

    monkeypatch.setattr(sources, "filesystem", lambda text: (NoCredentials(), text.split("://", 1)[1]))
    with pytest.raises(DataError, match=r"^s3://bucket/x/\*.jpg: cannot be read \(RuntimeError: Unable to locate"):
        sources.classify_inputs(["s3://bucket/x/*.jpg"])
