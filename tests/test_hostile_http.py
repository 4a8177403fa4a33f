"""Issue 21, round 2, the server's side: messages that name the server's own limits, every
HTTP error a JSON object (uvicorn's and Starlette's own answers included), a body that
cannot be parsed is 400, and one access-log line per request."""

from __future__ import annotations

import json
import socket
import struct
import zlib

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")
from fastapi.testclient import TestClient  # noqa: E402

from imgclf.serve import create_app  # noqa: E402
from imgclf.serve.protocol import BUSY, MALFORMED  # noqa: E402

from .conftest import PREDICT  # noqa: E402

DAISY = (PREDICT / "classic-daisy.jpg").read_bytes()


def png_header(width: int, height: int) -> bytes:
    """A PNG cut after its header and the start of its pixels: enough for the size check,
    which decodes nothing."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    )


@pytest.fixture(scope="module")
def client(small_onnx_model):
    with TestClient(create_app(small_onnx_model, max_batch=1)) as c:
        yield c


# --- item 9: messages name the limit in force ---


@pytest.mark.parametrize("width, height", [(20000, 10000), (20000, 20000)])  # 200 MP (Pillow warns), 400 MP (refuses)
def test_an_image_over_the_pixel_limit_is_refused_naming_the_servers_limit(client, width, height):
    """Issue 21 item 9: a 200-megapixel header got "more pixels than the 150,000,000 allowed"
    (the library's ceiling) from a server whose limit is 50 MP."""
    r = client.post("/v1/predict", content=png_header(width, height), headers={"content-type": "image/png"})
    assert r.status_code == 413
    error = r.json()["error"]
    assert "50,000,000 allowed" in error and "150,000,000" not in error, error
    assert f"{width}x{height}" in error or f"{width * height:,} pixels" in error, error


def test_the_library_names_the_limit_it_was_given():
    from imgclf.data.imaging import open_image
    from imgclf.errors import ImageTooLargeError

    with pytest.raises(
        ImageTooLargeError, match=r"^big.png: image is 20000x10000, more pixels than the 1,000 allowed$"
    ):
        open_image(png_header(20000, 10000), "big.png", max_pixels=1000)
    with pytest.raises(ImageTooLargeError, match=r"^big.png: image is 20000x10000, more pixels than the 150,000,000 "):
        open_image(png_header(20000, 10000), "big.png")


# --- item 10: every HTTP error is JSON, and a body that cannot be parsed is 400 ---


def raw_exchange(url: str, request: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` as it is on a new connection; the status, headers and body of the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


@pytest.mark.parametrize(
    "request_head",
    [
        b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\nContent-Length: ten\r\n\r\n",
        b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n",
        b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcd",
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nBroken header line\r\n\r\n",
    ],
)
def test_a_request_uvicorn_cannot_parse_is_answered_in_json(served, request_head):
    """Item 10: a bad Content-Length got uvicorn's plain-text "400 Invalid HTTP request received."."""
    url, _ = served
    status, headers, body = raw_exchange(url, request_head)
    assert status == 400 and headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert json.loads(body) == {"error": MALFORMED}


@pytest.fixture(scope="module")
def served(small_onnx_model, tmp_path_factory):
    from imgclf.serve.process import serve_in_subprocess

    log = tmp_path_factory.mktemp("served") / "stderr.log"
    with serve_in_subprocess(small_onnx_model, "--max-batch", "1", log=log) as (url, server):
        yield url, log


def test_a_connection_over_the_limit_is_answered_503_in_json(small_onnx_model):
    """Item 10: uvicorn's own 503 ("Service Unavailable", plain text) past the connection limit."""
    import threading
    import time

    from imgclf.serve.server import bind_socket, make_server

    sock = bind_socket("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = make_server(create_app(small_onnx_model, max_batch=1), max_connections=1)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as first:  # one connection: the limit
            first.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert b" 200 " in first.recv(65536).split(b"\r\n")[0]
            status, headers, body = raw_exchange(url, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert status == 503 and headers["content-type"] == "application/json" and headers["retry-after"] == "5"
        assert json.loads(body) == {"error": BUSY}
        status, _, body = raw_exchange(url, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert status == 200 and json.loads(body) == {"status": "ok"}  # the first one closed: served again
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_refused_cors_preflight_is_json(small_onnx_model):
    """Item 10: Starlette's CORSMiddleware answered a refused preflight in plain text."""
    app = create_app(small_onnx_model, max_batch=1, cors_origins=["https://photos.example"])
    with TestClient(app, base_url="http://localhost:8000") as c:
        asked = {"access-control-request-method": "POST"}
        r = c.options("/v1/predict", headers={"origin": "https://elsewhere.example", **asked})
        assert r.status_code == 400 and r.headers["content-type"] == "application/json"
        assert r.json() == {"error": "CORS preflight refused: origin 'https://elsewhere.example' may not call this "
                                     "API (imgclf serve --cors-origin names those that may)"}  # fmt: skip
        assert "POST" in r.headers["access-control-allow-methods"]  # Starlette's headers kept
        r = c.options("/v1/predict", headers={"origin": "https://photos.example", "access-control-request-method": "PUT",
                                              "access-control-request-headers": "X-Secret"})  # fmt: skip
        assert r.status_code == 400 and r.json()["error"].startswith(
            "CORS preflight refused: method 'PUT' is not allowed; use GET or POST; headers 'X-Secret' are not all "
            "allowed; allowed: "
        )
        r = c.options("/v1/predict", headers={"origin": "https://photos.example", **asked})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://photos.example"


def multipart(*files: tuple[str, bytes], boundary: str = "xx") -> bytes:
    parts = b"".join(
        b'--%s\r\nContent-Disposition: form-data; name="files"; filename="%s"\r\nContent-Type: image/jpeg\r\n\r\n'
        % (boundary.encode(), name.encode())
        + data
        + b"\r\n"
        for name, data in files
    )
    return parts + b"--%s--\r\n" % boundary.encode()


@pytest.mark.parametrize("cut", [8, 10, 200, 1000])
def test_a_multipart_body_cut_short_is_400(client, cut):
    """Item 10: a truncated multipart body parsed as an empty form and was answered 422 "no image
    in the request", where docs/serving.md says a malformed request is 400."""
    body = multipart(("a.jpg", DAISY), ("b.jpg", DAISY))
    r = client.post("/v1/predict", content=body[:-cut], headers={"content-type": "multipart/form-data; boundary=xx"})
    assert r.status_code == 400
    assert r.json() == {"error": "malformed multipart body: it ends before its closing boundary --xx-- (was the "
                                 "upload cut short?)"}  # fmt: skip
    r = client.post("/v1/predict", content=body, headers={"content-type": "multipart/form-data; boundary=xx"})
    assert r.status_code == 200 and [x["file"] for x in r.json()["results"]] == ["a.jpg", "b.jpg"]


def test_multipart_without_a_boundary_is_400_and_an_empty_form_stays_422(client):
    r = client.post("/v1/predict", content=multipart(("a.jpg", DAISY)), headers={"content-type": "multipart/form-data"})
    assert r.status_code == 400 and r.json() == {
        "error": "malformed multipart body: its Content-Type names no boundary"
    }
    r = client.post("/v1/predict", content=b"--xx--\r\n", headers={"content-type": "multipart/form-data; boundary=xx"})
    assert r.status_code == 422 and r.json()["error"].startswith("no image in the request")


# --- item 14: an access log, off with --quiet ---

ACCESS_LINE = r"^(GET|POST|OPTIONS|DELETE) (\S+) (\d{3}|-) (\d+\.\d) ms$"


def test_serve_logs_one_line_per_request_on_stderr_and_quiet_turns_it_off(served, small_onnx_model, tmp_path):
    """Item 14: `serve` wrote no access log."""
    import re
    import time
    import urllib.error
    import urllib.request

    from imgclf.serve.process import serve_in_subprocess

    def exchange(url: str) -> None:
        request = urllib.request.Request(f"{url}/v1/predict", data=DAISY, headers={"content-type": "image/jpeg"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"{url}/nope%0aGET%20/forged", timeout=30)
        time.sleep(0.3)

    url, log = served
    exchange(url)
    lines = [line for line in log.read_text().splitlines() if not line.startswith("WARNING:")]  # uvicorn's own
    access = [re.match(ACCESS_LINE, line) for line in lines]
    assert all(access), [line for line, m in zip(lines, access) if not m]  # nothing else on stderr
    seen = [(m[1], m[2], m[3]) for m in access]
    assert ("GET", "/healthz", "200") in seen and ("POST", "/v1/predict", "200") in seen
    assert ("GET", "/nope%0aGET%20/forged", "404") in seen  # as sent: one line, not two

    quiet_log = tmp_path / "quiet.log"
    with serve_in_subprocess(small_onnx_model, "--max-batch", "1", "--quiet", log=quiet_log) as (quiet_url, _):
        exchange(quiet_url)
    assert not [line for line in quiet_log.read_text().splitlines() if re.match(ACCESS_LINE, line)]


def test_access_log_of_the_app(small_onnx_model):
    import io
    import re

    stream = io.StringIO()
    app = create_app(small_onnx_model, max_batch=1, allowed_hosts=["localhost"], access_log=stream)
    with TestClient(app, base_url="http://localhost") as c:
        c.post("/v1/predict?top_k=2", content=DAISY, headers={"content-type": "image/jpeg"})
        c.get("/v1/model", headers={"host": "rebound.example"})  # refused by the Host check: logged too
    lines = stream.getvalue().splitlines()
    assert [re.match(ACCESS_LINE, line).group(1, 2, 3) for line in lines] == [
        ("POST", "/v1/predict", "200"),
        ("GET", "/v1/model", "400"),
    ]
