"""The HTTP API: every endpoint, every class of bad input, concurrent clients."""

import io
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("torch")
from fastapi.testclient import TestClient  # noqa: E402

from imgclf.data.imaging import MAX_PIXELS  # noqa: E402
from imgclf.serve import create_app  # noqa: E402

from .conftest import FLOWERS, PREDICT  # noqa: E402

DAISY = (PREDICT / "classic-daisy.jpg").read_bytes()


@pytest.fixture(scope="module")
def client(small_model, tmp_path_factory):
    path = small_model.save(tmp_path_factory.mktemp("serve") / "small.imgclf")
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
    r = client.post("/v1/predict", data={"note": "no files"}, files=[])
    assert r.status_code in (415, 422)
    r = client.post("/v1/predict?top_k=0", content=DAISY, headers={"content-type": "image/jpeg"})
    assert r.status_code == 422


def test_malformed_multipart_does_not_crash(client):
    r = client.post(
        "/v1/predict", content=b"--xx\r\nbroken", headers={"content-type": "multipart/form-data; boundary=xx"}
    )
    assert r.status_code in (415, 422)
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
        (["serve", "{model}", "--max-batch", "0"], "max_batch must be at least 1"),
        (["serve", "{model}", "--max-request-mb", "0"], "max_request_bytes must be positive"),
        (["serve", "{model}", "--port", "70000"], "--port must be between 1 and 65535"),
    ],
)
def test_serve_bad_options_exit_2(argv, message, small_model, tmp_path, capsys):
    from imgclf.cli import main

    model = small_model.save(tmp_path / "m.imgclf")
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{model}", str(model)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("imgclf: error:") and message in err and len(err.splitlines()) == 1


def test_server_in_a_child_process_answers_and_stops(small_model, tmp_path):
    import json
    import urllib.request

    from imgclf.serve.process import serve_in_subprocess

    path = small_model.save(tmp_path / "small.imgclf")
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
