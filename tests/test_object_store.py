"""Object stores through fsspec (issue 21 item 4), against a real S3-compatible server
(moto's, on loopback): images, the model and the results folder all in the store,
resumable after a kill, finished only when ``_SUCCESS`` is there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from .conftest import FLOWERS  # noqa: E402


@pytest.fixture(scope="module")
def s3(small_onnx_model):
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("photos")
    for f in sorted(FLOWERS.glob("*/*.jpg"))[:150]:  # the run takes seconds, long enough to be killed midway
        fs.put_file(str(f), f"photos/in/{f.parent.name}/{f.name}")
    fs.pipe_file("photos/in/daisy/broken.jpg", b"not a picture")
    fs.put_file(str(small_onnx_model), "photos/models/m.onnx")
    yield fs, {**os.environ}
    server.stop()
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _imgclf(env, *args, **kw):
    return subprocess.run([sys.executable, "-m", "imgclf", *args], env=env, capture_output=True, text=True, **kw)


def test_model_inputs_and_results_in_the_store_resume_after_a_kill(s3, tmp_path):
    fs, env = s3
    out = "s3://photos/results/r.jsonl"
    argv = [sys.executable, "-m", "imgclf", "predict", "s3://photos/models/m.onnx", "s3://photos/in/",
            "--out", out, "--commit-every", "0.2", "--batch-size", "2", "-q"]  # fmt: skip
    run = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not fs.glob("photos/results/r.jsonl/part-*"):
        fs.invalidate_cache()
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL  # killed midway, not finished
    fs.invalidate_cache()
    names = [os.path.basename(p) for p in fs.ls("photos/results/r.jsonl")]
    assert "_SUCCESS" not in names and any(n.startswith("part-") for n in names)  # a killed job never looks finished
    assert not any(n.endswith(".inprogress") for n in names)  # only whole parts in the store

    again = _imgclf(env, *argv[3:])
    assert again.returncode == 0, again.stderr
    assert "skipped" in again.stdout  # the parts from before the kill were kept
    fs.invalidate_cache()
    rows = [json.loads(line) for p in sorted(fs.glob("photos/results/r.jsonl/part-*")) for line in
            fs.cat_file(p).decode().splitlines()]  # fmt: skip
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)) == 151  # every input exactly once
    assert sum(r["error"] is not None for r in rows) == 1
    meta = json.loads(fs.cat_file("photos/results/r.jsonl/_imgclf.json"))
    assert meta["rows"] == 151 and meta["error_rows"] == 1 and fs.exists("photos/results/r.jsonl/_SUCCESS")
    assert not fs.exists("photos/results/r.jsonl/_imgclf.lock")


def test_the_same_answers_as_a_local_run(s3, tmp_path, small_onnx_model):
    fs, env = s3
    local = _imgclf(env, "predict", str(small_onnx_model), str(FLOWERS / "daisy"), "--json", "--top-k", "3")
    remote = _imgclf(env, "predict", "s3://photos/models/m.onnx", str(FLOWERS / "daisy"), "--json", "--top-k", "3")
    assert local.returncode == remote.returncode == 0
    assert [r["scores"] for r in json.loads(local.stdout)] == [r["scores"] for r in json.loads(remote.stdout)]
    exported = _imgclf(env, "export", "s3://photos/models/missing.imgclf")
    assert exported.returncode == 2 and "s3://photos/models/missing.imgclf: model file not found" in exported.stderr


@pytest.mark.parametrize(
    "uri, message",
    [
        ("gs://bucket/r.parquet", "gs:// needs the 'gcsfs' package: pip install gcsfs"),
        ("nosuchscheme://bucket/r.parquet", "fsspec knows no filesystem for nosuchscheme://"),
    ],
)
def test_an_unusable_uri_is_one_line_before_any_work(s3, uri, message):
    fs, env = s3
    done = _imgclf(env, "predict", "s3://photos/models/m.onnx", str(FLOWERS / "daisy"), "--out", uri)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_a_second_writer_is_refused_while_the_first_runs(s3):
    from imgclf.batch.results import result_metadata
    from imgclf.batch.writers import open_results
    from imgclf.errors import OptionError

    meta = result_metadata("m.onnx", "0" * 64, ["a", "b"], 1)
    with open_results("s3://photos/locked/r.csv", meta):
        with pytest.raises(OptionError, match="another imgclf run is writing there"):
            with open_results("s3://photos/locked/r.csv", meta):
                pass
    with open_results("s3://photos/locked/r.csv", meta):  # released: usable again
        pass
