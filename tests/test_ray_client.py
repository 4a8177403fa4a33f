"""`--engine ray --address ray://HOST:PORT` (issue 21 item 5): Ray Client is installed with
the ray extra; an address where nothing answers and a real Ray Client server on loopback
(attached to a local Ray) each give one line, exit 2, within seconds."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("grpc")  # ray[client], in the ray extra

from .conftest import PREDICT  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _predict(model, address: str, out) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "imgclf", "predict", str(model), str(PREDICT), "--engine", "ray",
            "--address", address, "--out", str(out), "-q"]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def test_an_address_where_nothing_answers_is_one_line_at_once(small_onnx_model, tmp_path):
    started = time.monotonic()
    done = _predict(small_onnx_model, f"ray://127.0.0.1:{_free_port()}", tmp_path / "r.parquet")
    assert done.returncode == 2 and time.monotonic() - started < 30
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot connect to the Ray cluster: nothing answers at 127.0.0.1" in lines[0]
    assert not (tmp_path / "r.parquet").exists()


@pytest.mark.slow
def test_a_ray_client_server_answers_and_imgclf_says_how_to_run_there(small_onnx_model, tmp_path):
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    port = _free_port()
    gcs = ray.get_runtime_context().gcs_address
    server = subprocess.Popen([sys.executable, "-m", "ray.util.client.server", "--address", gcs, "--host",
                               "127.0.0.1", "--port", str(port), "--mode", "legacy"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                time.sleep(0.2)
        done = _predict(small_onnx_model, f"ray://127.0.0.1:{port}", tmp_path / "r.parquet")
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert "the cluster answers, but Ray Data does not run through Ray Client" in lines[0]
        assert "ray job submit" in lines[0]
    finally:
        server.terminate()
        server.wait(timeout=30)
        if started_here:
            ray.shutdown()
