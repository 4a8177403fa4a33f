"""Issue 21, round 2, the server's side: messages that name the server's own limits, every
HTTP error a JSON object (uvicorn's and Starlette's own answers included), a body that
cannot be parsed is 400, and one access-log line per request."""

from __future__ import annotations

import struct
import zlib

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")
from fastapi.testclient import TestClient  # noqa: E402

from imgclf.serve import create_app  # noqa: E402

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
