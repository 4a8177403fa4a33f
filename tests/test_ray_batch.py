"""Ray Data engine: `imgclf predict --engine ray` and `imgclf.batch.predict_dataset`
agree with plain predict, on one shared Ray session of 2 CPUs for the whole run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pq = pytest.importorskip("pyarrow.parquet")
ray = pytest.importorskip("ray")

from imgclf.cli import main  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data")  # Ray Data's own settings

from .conftest import CORRUPT, FLOWERS, PREDICT, assert_agrees_with_predict_json, predict_json, scoring_folder  # noqa: E402


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray of 2 CPUs for every Ray test (its workers inherit this environment)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def test_engine_ray_agrees_with_predict_json(ray_session, small_onnx_model, tmp_path, capsys):
    folder = scoring_folder(tmp_path / "images")
    listed = tmp_path / "lists"
    listed.mkdir()
    (listed / "more.txt").write_text(f"{PREDICT / 'classic-tulip.jpg'}\n# a comment\n{tmp_path / 'gone.jpg'}\n")
    rose, sunflower = sorted((FLOWERS / "roses").glob("*.jpg"))[0], sorted((FLOWERS / "sunflowers").glob("*.jpg"))[0]
    (listed / "hf.jsonl").write_text(json.dumps({"file_name": str(rose), "label": "roses"}) + "\n")  # as train reads it
    (listed / "other.csv").write_text(f"image,note\n{sunflower},x\n")
    out = tmp_path / "results.parquet"
    argv = ["predict", small_onnx_model, folder, listed / "more.txt", listed / "hf.jsonl", listed / "other.csv",
            "--engine", "ray", "--out", out, "--workers", 2, "--top-k", 2, "-q"]  # fmt: skip
    code = main([str(a) for a in argv])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "Scored 11 image(s), 4 unreadable (error rows)" in stdout and "ray" in stdout
    table = pq.read_table(out)
    rows = table.to_pylist()
    expected = predict_json(small_onnx_model, folder, PREDICT / "classic-tulip.jpg", rose, sunflower)
    expected[str(tmp_path / "gone.jpg")] = {"error": "missing"}
    assert_agrees_with_predict_json(rows, expected)
    assert {Path(r["path"]).name for r in rows if r["error"]} == CORRUPT | {"gone.jpg"}
    meta = json.loads(table.schema.metadata[b"imgclf"])  # Ray's writer kept the key-value metadata
    assert meta["labels"] == ["daisy", "dandelion", "tulips"] and meta["top_k"] == 2
    assert not [p for p in out.iterdir() if p.name.startswith("_staging-")]

    # Python: predict_dataset on a Dataset of your own (its reader keeps one CPU: one actor here)
    from imgclf.batch import predict_dataset

    images = ray.data.read_binary_files([str(folder / "classic-daisy.jpg"), str(folder / "truncated.jpg")],
                                        include_paths=True)  # fmt: skip
    chained = predict_dataset(small_onnx_model, images, workers=1).take_all()
    by_path = {r["path"]: r for r in chained}
    daisy = by_path[str(folder / "classic-daisy.jpg")]
    assert daisy["label"] == "daisy"
    assert abs(daisy["probability"] - expected[str(folder / "classic-daisy.jpg")]["probability"]) < 1e-5
    assert "corrupt or truncated" in by_path[str(folder / "truncated.jpg")]["error"]


def test_engine_ray_takes_names_that_are_not_utf8_and_link_loops(ray_session, small_onnx_model, tmp_path, capsys):
    """Issue 21 items 1 and 2 on Ray: Ray's reader takes neither, so imgclf reads them itself."""
    import os
    import shutil

    from imgclf.batch.writers import read_part_paths

    folder = tmp_path / "hostile"
    folder.mkdir()
    for f in sorted(PREDICT.glob("*.jpg")):
        shutil.copy(f, folder / f.name)
    odd = os.fsencode(folder) + b"/caf\xe9.jpg"
    shutil.copy(PREDICT / "classic-daisy.jpg", odd)
    os.symlink("loop.jpg", folder / "loop.jpg")
    out = tmp_path / "r.parquet"
    argv = ["predict", str(small_onnx_model), str(folder), "--engine", "ray", "--out", str(out), "--workers", "1", "-q"]
    assert main(argv) == 0, capsys.readouterr().err
    assert "Scored 3 image(s), 1 unreadable (error rows)" in capsys.readouterr().out
    parts = [p for p in sorted(out.glob("*.parquet")) if p.name[0] not in "._"]  # Ray names its own parts
    paths = [p for part in parts for p in read_part_paths(part, "parquet")]
    assert sorted(paths) == sorted([*(str(folder / f.name) for f in PREDICT.glob("*.jpg")), os.fsdecode(odd),
                                    str(folder / "loop.jpg")])  # fmt: skip
    rows = {r["path"]: r for r in pq.read_table(out).to_pylist()}
    assert rows[str(folder / "caf\\xe9.jpg")]["label"] == "daisy"
    assert "Too many levels of symbolic links" in rows[str(folder / "loop.jpg")]["error"]


def test_a_run_prints_only_imgclfs_lines(small_onnx_model, tmp_path):
    """Issue 21 item 14: `--engine ray` printed about 20 lines of Ray's INFO and WARNING (a token
    notice, a deprecation warning caused by imgclf's own `concurrency=`, the execution plan,
    progress logged as lines, a core-worker line per actor). A fresh process starts its own Ray."""
    import os
    import subprocess
    import sys

    folder = scoring_folder(tmp_path / "images")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    for quiet in ([],):  # without -q (what a user types first); -q only turns progress bars off
        out = tmp_path / f"results{len(quiet)}.parquet"
        run = subprocess.run([sys.executable, "-m", "imgclf", "predict", str(small_onnx_model), str(folder), "--engine",
                              "ray", "--out", str(out), "--workers", "1", *quiet], capture_output=True, text=True,
                             env=env, timeout=300)  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert run.stderr == "", run.stderr
        assert (
            run.stdout.startswith("Scored 8 image(s), 3 unreadable (error rows)") and len(run.stdout.splitlines()) == 1
        )


def test_the_stderr_filter_leaves_out_only_the_known_line(tmp_path):
    """Ray's core writes its per-actor line straight to file descriptor 2; what else is written
    there (real errors) passes, and Python's own stderr is untouched."""
    import subprocess
    import sys

    noise = (b"[2026-12-06 11:25:59,983 E 6757 6757] core_worker.cc:2465: Actor with class name: 'MapWorker(MapBatches"
             b"(_ImageScorer))' and ID: '3fc3c70766b211cbf468a24001000000' has constructor arguments in the object "
             b"store and max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor "
             b"restart will fail. See https://github.com/ray-project/ray/issues/53727 for more details.\n")  # fmt: skip
    code = (
        "import os, sys\n"
        "from imgclf.batch.ray import filtered_stderr\n"
        "with filtered_stderr():\n"
        f"    os.write(2, {noise!r})\n"
        "    os.write(2, b'[E core_worker.cc:1] a real error\\n')\n"
        "    print('python, isatty as before:', sys.stderr.isatty(), file=sys.stderr)\n"
        "    os.write(2, b'no newline at the end')\n"
        "print('after', file=sys.stderr)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr
    lines = run.stderr.decode().splitlines()  # the partial line is passed on before the block ends
    assert sorted(lines) == ["[E core_worker.cc:1] a real error", "no newline at the endafter",
                             "python, isatty as before: False"]  # fmt: skip
