"""The HTTP API: every endpoint, every class of bad input, concurrent clients."""

import io
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("torch")
from fastapi.testclient import TestClient  # noqa: E402

from imgclf.data.imaging import MAX_PIXELS  # noqa: E402
from imgclf.errors import OptionError  # noqa: E402
from imgclf.serve import create_app  # noqa: E402

from .conftest import FLOWERS, PREDICT  # noqa: E402

DAISY = (PREDICT / "classic-daisy.jpg").read_bytes()


@pytest.fixture(scope="module")
def client(small_model_file):
    path = small_model_file
    with TestClient(create_app(path, max_request_bytes=1_000_000)) as c:
        yield c


def test_health_model_docs_and_page(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    info = client.get("/v1/model").json()
    assert info["labels"] == ["daisy", "dandelion", "tulips"] and info["arch"] == "efficientnet_lite0"
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200
    page = client.get("/").text
    assert "<title>imgclf</title>" in page and "http://" not in page.replace("http://www.w3.org", "")


def test_raw_image_body(client):
    r = client.post("/v1/predict?top_k=2", content=DAISY, headers={"content-type": "image/jpeg"})
    assert r.status_code == 200
    res = r.json()["results"][0]
    assert res["label"] == "daisy" and len(res["scores"]) == 2 and r.json()["elapsed_ms"] > 0


def test_multipart_many_files(client):
    tulip = (PREDICT / "classic-tulip.jpg").read_bytes()
    files = [("files", ("a.jpg", DAISY, "image/jpeg")), ("files", ("b.jpg", tulip, "image/jpeg"))]
    r = client.post("/v1/predict", files=files)
    assert r.status_code == 200
    assert [x["label"] for x in r.json()["results"]] == ["daisy", "tulips"]
    assert [x["file"] for x in r.json()["results"]] == ["a.jpg", "b.jpg"]


def test_content_is_sniffed_not_trusted(client):
    png = io.BytesIO()
    Image.open(io.BytesIO(DAISY)).save(png, "PNG")
    r = client.post("/v1/predict", files=[("files", ("lies.txt", png.getvalue(), "text/plain"))])
    assert r.status_code == 200 and r.json()["results"][0]["label"] == "daisy"
    r = client.post("/v1/predict", files=[("files", ("fake.jpg", b"GIF89a not really", "image/jpeg"))])
    assert r.status_code == 415 and "fake.jpg" in r.json()["error"]


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"", 415, "empty"),
        (b"hello, I am text", 415, "not an image"),
        (DAISY[:2500], 415, "truncated"),
    ],
)
def test_bad_images(client, body, status, message):
    r = client.post("/v1/predict", content=body, headers={"content-type": "image/jpeg"})
    assert r.status_code == status and message in r.json()["error"]


def test_too_large_request_is_413(client):
    r = client.post("/v1/predict", content=b"\xff" * 1_200_000, headers={"content-type": "image/jpeg"})
    assert r.status_code == 413 and "limit" in r.json()["error"]


def test_decompression_bomb_is_refused(client):
    side = int(MAX_PIXELS**0.5) + 100
    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, "PNG", optimize=True)
    assert len(buf.getvalue()) < 1_000_000
    r = client.post("/v1/predict", content=buf.getvalue(), headers={"content-type": "image/png"})
    assert r.status_code == 413 and "more pixels than" in r.json()["error"]


def test_wrong_content_type_and_empty_form(client):
    r = client.post("/v1/predict", content=b"{}", headers={"content-type": "application/json"})
    assert r.status_code == 415 and "multipart" in r.json()["error"]
    r = client.post("/v1/predict", data={"note": "no files"}, files=[])  # sent url-encoded: not multipart
    assert r.status_code == 415 and "not 'application/x-www-form-urlencoded'" in r.json()["error"]
    r = client.post("/v1/predict", content=b"--xx--\r\n", headers={"content-type": "multipart/form-data; boundary=xx"})
    assert r.status_code == 422 and "no image in the request" in r.json()["error"]  # the docs' one status
    r = client.post("/v1/predict")  # nothing at all (curl -X POST): it was 415 "not 'nothing'"
    assert r.status_code == 422 and "no image in the request" in r.json()["error"]
    r = client.post("/v1/predict?top_k=0", content=DAISY, headers={"content-type": "image/jpeg"})
    assert r.status_code == 422


def test_malformed_multipart_does_not_crash(client):
    r = client.post(
        "/v1/predict", content=b"--xx\r\nbroken", headers={"content-type": "multipart/form-data; boundary=xx"}
    )
    # cut short before its closing boundary: a body that cannot be parsed is 400, as docs/serving.md says
    assert r.status_code == 400 and r.json()["error"].startswith("malformed multipart body: it ends before its closing")
    assert client.get("/healthz").status_code == 200


def test_concurrent_clients_get_the_same_answers_as_one_at_a_time(client, small_model):
    photos = [f.read_bytes() for f in sorted((FLOWERS / "daisy").glob("*.jpg"))[:6]]
    photos += [f.read_bytes() for f in sorted((FLOWERS / "tulips").glob("*.jpg"))[:6]]
    expected = [small_model.predict(p) for p in photos]

    def post(data):
        return client.post("/v1/predict?top_k=3", content=data, headers={"content-type": "image/jpeg"})

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, photos * 3))
    assert all(r.status_code == 200 for r in responses)
    for r, e in zip(responses, expected * 3):
        res = r.json()["results"][0]
        assert res["label"] == e.label and abs(res["probability"] - e.probability) < 1e-4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "{tmp}/missing.imgclf"], "model file not found"),
        (["serve", "{model}", "--max-batch", "0"], "--max-batch must be an integer from 1 to 64, got 0"),
        (["serve", "{model}", "--max-request-mb", "0"], "--max-request-mb must be a number between 0 and 1,000,000,000 (exclusive), got 0.0"),
        (["serve", "{model}", "--port", "70000"], "--port must be an integer from 1 to 65535"),
    ],
)
def test_serve_bad_options_exit_2(argv, message, small_model_file, tmp_path, capsys):
    from imgclf.cli import main

    model = small_model_file
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{model}", str(model)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("imgclf: error:") and message in err and len(err.splitlines()) == 1


def test_server_in_a_child_process_answers_and_stops(small_model_file):
    import json
    import urllib.request

    from imgclf.serve.process import serve_in_subprocess

    path = small_model_file
    with serve_in_subprocess(path, "--max-batch", "4") as (url, server):
        request = urllib.request.Request(f"{url}/v1/predict", data=DAISY, headers={"content-type": "image/jpeg"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.load(response)["results"][0]["label"] == "daisy"
    assert server.returncode is not None  # stopped when the block ended


def test_server_that_dies_while_starting_says_why(tmp_path):
    from imgclf.serve.process import serve_in_subprocess

    with pytest.raises(RuntimeError, match="exited with code 2: .*model file not found"):
        with serve_in_subprocess(tmp_path / "missing.imgclf"):
            pass


# --- issue 10: bounded memory (defect 1) and consistent errors (defect 10) ---


def test_huge_upload_is_refused_by_the_serving_pixel_limit(client):
    """Defect 1: a 300 KB 12000x12000 16-bit PNG took 10 s and gigabytes; the server's
    pixel limit (50 MP by default) refuses it from its header."""
    from imgclf.serve.limits import SERVE_MAX_PIXELS
    from imgclf.testing import blank_png

    r = client.post("/v1/predict", content=blank_png(12000, 12000, 16, 0, 117), headers={"content-type": "image/png"})
    assert r.status_code == 413
    assert r.json()["error"] == f"upload: image is 12000x12000, more pixels than the {SERVE_MAX_PIXELS:,} allowed"


def test_image_that_cannot_fit_the_decode_budget_is_413(small_model):
    from imgclf.testing import blank_png

    with TestClient(create_app(small_model, max_batch=1, decode_memory_bytes=16 * 1024 * 1024)) as c:
        r = c.post("/v1/predict", files=[("files", ("wide.png", blank_png(3000, 2000, 8, 6), "image/png")),
                                         ("files", ("daisy.jpg", DAISY, "image/jpeg"))])  # fmt: skip
        assert r.status_code == 200
        wide, daisy = r.json()["results"]
        assert wide["error"].startswith("wide.png: decoding it needs about") and "16 MB decode budget" in wide["error"]
        assert daisy["label"] == "daisy"
        assert c.app.state.decode_budget.peak <= 16 * 1024 * 1024


@pytest.mark.parametrize(
    "method, path, status, message",
    [
        ("GET", "/nope", 404, "no such endpoint: /nope"),
        ("GET", "/v1/predict", 405, "GET is not allowed on /v1/predict; use POST"),
        ("DELETE", "/v1/model", 405, "DELETE is not allowed on /v1/model; use GET"),
        ("POST", "/v1/predict?top_k=0", 422, "top_k: Input should be greater than or equal to 1"),
        ("POST", "/v1/predict?top_k=many", 422, "top_k: Input should be a valid integer"),
    ],
)
def test_every_error_is_an_error_object(client, method, path, status, message):
    """Defect 10: 404, 405 and a bad top_k answered {"detail": ...}."""
    r = client.request(method, path, content=DAISY, headers={"content-type": "image/jpeg"})
    assert r.status_code == status
    assert list(r.json()) == ["error"] and r.json()["error"].startswith(message)


def test_65_files_are_refused_naming_the_limit(client):
    """Defect 10: 65 files got 422 'malformed multipart body'."""
    tiny = io.BytesIO()
    Image.new("RGB", (8, 8), "white").save(tiny, "PNG")
    files = [("files", (f"{i}.png", tiny.getvalue(), "image/png")) for i in range(65)]
    r = client.post("/v1/predict", files=files)
    assert r.status_code == 413
    assert r.json() == {"error": "a request may carry at most 64 files; send the others in further requests"}


def test_all_failed_response_has_no_null_fields(client):
    """Defect 10: when every image failed, the answer carried label/probability/scores: null."""
    files = [("files", ("a.jpg", b"not an image", "image/jpeg")), ("files", ("b.jpg", b"", "image/jpeg"))]
    r = client.post("/v1/predict", files=files)
    assert r.status_code == 415
    body = r.json()
    assert body["error"].startswith("a.jpg: not an image") and body["model"] == "small.imgclf"

    def nulls(value):
        if isinstance(value, dict):
            return any(v is None or nulls(v) for v in value.values())
        return isinstance(value, list) and any(nulls(v) for v in value)

    assert not nulls(body)
    assert [set(x) for x in body["results"]] == [{"file", "error"}, {"file", "error"}]


def test_docs_work_offline(client):
    """Defect 10: /docs loaded Swagger UI from a CDN and was blank offline."""
    import re

    html = client.get("/docs").text
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets and all(a.startswith("/") for a in assets), assets
    assert "https://" not in html and "http://" not in html
    for asset in assets:
        r = client.get(asset)
        assert r.status_code == 200 and len(r.content) > 1000, asset
    assert any(a.endswith(".js") for a in assets) and any(a.endswith(".css") for a in assets)


def test_api_key(small_model):
    with TestClient(create_app(small_model, max_batch=1, api_key="s3cret")) as c:
        assert c.get("/healthz").status_code == 200 and c.get("/docs").status_code == 200
        r = c.get("/v1/model")
        assert r.status_code == 401 and r.json() == {
            "error": "missing or wrong API key: send it in the X-API-Key header"
        }
        assert c.get("/v1/model", headers={"x-api-key": "wrong"}).json() == {"error": "wrong API key"}
        assert c.get("/v1/model", headers={"x-api-key": "s3cret"}).status_code == 200
        r = c.post(
            "/v1/predict", content=DAISY, headers={"content-type": "image/jpeg", "authorization": "Bearer s3cret"}
        )
        assert r.status_code == 200 and r.json()["results"][0]["label"] == "daisy"
        assert c.post("/v1/predict", content=DAISY, headers={"content-type": "image/jpeg"}).status_code == 401
        schemes = c.get("/openapi.json").json()["components"]["securitySchemes"]
        assert {s["type"] for s in schemes.values()} == {"apiKey", "http"}


def test_cors_and_host_check(small_model):
    app = create_app(small_model, max_batch=1, cors_origins=["https://photos.example"], allowed_hosts=["localhost"])
    with TestClient(app, base_url="http://localhost:8000") as c:
        preflight = {"origin": "https://photos.example", "access-control-request-method": "POST"}
        r = c.options("/v1/predict", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://photos.example"
        r = c.get("/v1/model", headers={"origin": "https://elsewhere.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        r = c.get("/v1/model", headers={"host": "rebound.example:8000"})
        assert r.status_code == 400 and r.json()["error"].startswith("Host 'rebound.example:8000' is not served here")
        assert c.get("/healthz", headers={"host": "LOCALHOST"}).status_code == 200


@pytest.mark.parametrize("cors_origins, allowed_hosts, message", [
    ("https://photos.example", None, "cors_origins must be a list of names, got the text 'https://photos.example'"),
    ((), "localhost", "allowed_hosts must be a list of names, got the text 'localhost'"),
    (["https://photos.example/"], None, "cors_origins must be * or a scheme and host"),
    ((), ["photos.example:8000"], "allowed_hosts must be * or a host name"),
])  # fmt: skip
def test_create_app_refuses_origins_and_hosts_that_could_never_match(cors_origins, allowed_hosts, message, small_model):
    """A bare string was read a letter at a time; these would leave every page or request refused."""
    with pytest.raises(OptionError, match=re.escape(message)):
        create_app(small_model, max_batch=1, cors_origins=cors_origins, allowed_hosts=allowed_hosts)
    app = create_app(small_model, max_batch=1, cors_origins=["*"], allowed_hosts=["::1", "[::1]", "photos.example"])
    with TestClient(app, base_url="http://[::1]:8000") as c:
        assert c.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "{model}", "--host", "0.0.0.0"], "--host 0.0.0.0 serves beyond this machine, so an API key is"),
        # a typo was first met with the API key a public address needs, then with this
        (["serve", "{model}", "--host", "999.1.1.1"], "--host 999.1.1.1: not an address or a name this machine"),
        (["serve", "{model}", "--max-pixels", "0"], "--max-pixels must be an integer from 1 to 150,000,000"),
        (["serve", "{model}", "--decode-memory-mb", "1"], "--decode-memory-mb must be a number >= 16"),
        (["serve", "{model}", "--read-timeout", "0"], "--read-timeout must be a positive number"),
        (["serve", "{model}", "--api-key", "k", "--no-api-key"], "--no-api-key contradicts the API key"),
        # these started a server that no page (empty origin, trailing /) or no request (port) could reach
        (["serve", "{model}", "--cors-origin", ""], "--cors-origin must be * or a scheme and host"),
        (["serve", "{model}", "--cors-origin", "*", "--cors-origin", "https://photos.example/"],
         "--cors-origin must be * or a scheme and host such as https://example.com (no path, no trailing /), "
         "got 'https://photos.example/'"),
        (["serve", "{model}", "--allowed-host", ""], "--allowed-host must be * or a host name or address"),
        (["serve", "{model}", "--allowed-host", "localhost:8000"], "--allowed-host must be * or a host name"),
        (["serve", "{model}", "--allowed-host", "http://localhost"], "--allowed-host must be * or a host name"),
    ],
)
def test_serve_new_options_are_checked(argv, message, small_model_file, capsys, monkeypatch):
    import socket

    from imgclf.cli import main

    monkeypatch.delenv("IMGCLF_API_KEY", raising=False)
    model = small_model_file
    with socket.socket() as taken:  # should a check be missed, serving fails on this port instead of running on
        taken.bind(("", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert main([a.replace("{model}", str(model)) for a in argv] + ["--port", port]) == 2
    out = capsys.readouterr()
    assert out.err.startswith(f"imgclf: error: {message}") and len(out.err.strip().splitlines()) == 1
    assert "Serving" not in out.out


def test_port_in_use_is_one_line_exit_2_before_serving(small_model_file, capsys):
    """Defect 10: a port in use exited 3 after printing 'Serving on'."""
    import socket

    from imgclf.cli import main

    model = small_model_file
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(model), "--port", str(port)]) == 2
    out = capsys.readouterr()
    assert (
        out.err
        == f"imgclf: error: port {port} on 127.0.0.1 is already in use; stop what uses it or pick another with --port\n"
    )
    assert out.out == ""


def test_batches_hold_up_to_max_batch_images(small_onnx_model):
    """docs/serving.md: concurrent requests "gathered into batches of up to --max-batch". 24 requests at
    once with --max-batch 4: every network call holds 1 to 4 images, and some hold 4."""
    from imgclf.inference.runtime import load_onnx_model

    predictor = load_onnx_model(small_onnx_model)
    sizes = []
    real = predictor.predict_arrays  # probabilities and unknown scores, one network call

    def recording(x):
        sizes.append(len(x))
        return real(x)

    predictor.predict_arrays = recording
    photos = [f.read_bytes() for f in sorted((FLOWERS / "daisy").glob("*.jpg"))[:6]]
    with TestClient(create_app(predictor, max_batch=4, max_wait_ms=50)) as client:
        assert sorted(sizes) == [1, 2, 3, 4]  # the warm-up, one call per batch size
        sizes.clear()

        def post(data):
            return client.post("/v1/predict", content=data, headers={"content-type": "image/jpeg"})

        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(post, photos * 4))
    assert all(r.status_code == 200 for r in responses)
    assert sum(sizes) == 24 and max(sizes) == 4 and min(sizes) >= 1, sizes


def test_ctrl_c_during_the_warm_up_stops_it(monkeypatch):
    """A hostile pass: `serve --max-batch 400` warmed up every batch size from 400 down before it
    answered, deaf to Ctrl-C for over a minute. The warm-up asks between sizes whether the server
    was asked to stop, and run_server wires that question to uvicorn's own flag."""
    import asyncio
    from types import SimpleNamespace

    import numpy as np
    import uvicorn

    from imgclf.serve.batching import Batcher
    from imgclf.serve.server import run_server

    sizes = []
    predictor = SimpleNamespace(preprocessing=SimpleNamespace(input_size=8, shape=(8, 8)),
                                predict_arrays=lambda a: sizes.append(len(a)) or np.zeros((len(a), 2)))  # fmt: skip

    async def warm(stopping):
        batcher = Batcher(predictor, max_batch=64)
        await batcher.start(stopping)
        await batcher.stop()

    asyncio.run(warm(lambda: len(sizes) >= 3))  # Ctrl-C after the third size
    assert sizes == [64, 63, 62]
    sizes.clear()
    asyncio.run(warm(lambda: False))
    assert sizes == list(range(64, 0, -1))  # otherwise every size, largest first

    app = SimpleNamespace(state=SimpleNamespace(serve=SimpleNamespace(stopping=lambda: False)))
    seen = []

    def run(server, sockets=None):  # what uvicorn's signal handler does, then what the warm-up asks
        server.should_exit = True
        seen.append(app.state.serve.stopping())

    monkeypatch.setattr(uvicorn.Server, "run", run)
    run_server(app, sock=None)
    assert seen == [True]
