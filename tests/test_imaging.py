"""Decoding in bounded memory: huge images cost their decoded size once, not several
times over, and normal photos decode as before."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from imgclf.data.imaging import Preprocessing, load_array, open_image
from imgclf.errors import ImageTooLargeError
from imgclf.testing import blank_png

from .conftest import FLOWERS, PREDICT

PREP = Preprocessing(224, 0.875, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
MB = 1024 * 1024


def test_blank_png_is_a_real_image():
    img = Image.open(io.BytesIO(blank_png(301, 1203, 16, 0, 117)))
    assert img.mode == "I;16" and img.size == (301, 1203)
    assert np.unique(np.asarray(img)).tolist() == [117 * 257]
    rgba = Image.open(io.BytesIO(blank_png(40, 3000, 8, 6, 200)))
    assert rgba.mode == "RGBA" and np.unique(np.asarray(rgba)).tolist() == [200]


DECODE_IN_CHILD = """
import json, resource, sys
from pathlib import Path
from imgclf.data.imaging import Preprocessing, load_array
prep = Preprocessing(224, 0.875, "bicubic", (0.5,) * 3, (0.5,) * 3)
data = Path(sys.argv[1]).read_bytes()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
x = load_array(data, prep, "huge.png")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"used": peak - before, "mean": float(x.mean())}), flush=True)
from imgclf.data.imaging import _open_lazily, _resize_bytes, decode_bytes
img = _open_lazily(data, "huge.png", prep.resize_to, 10**9)
print(decode_bytes(img, prep.resize_to) + _resize_bytes(img.size, prep.resize_to))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="peak memory from getrusage in kilobytes (Linux)")
@pytest.mark.parametrize("bit_depth, stored_bytes", [(16, 2), (8, 1)])
def test_huge_png_costs_its_decoded_size_once(tmp_path, bit_depth, stored_bytes):
    """Defect 1: an 8000x8000 PNG of a few hundred KB took gigabytes (a float64 copy
    of 16-bit pixels, RGB copies at full size, bicubic over every source pixel).
    Now: the pixels as Pillow stores them, an 8-bit copy, and a few MB more; and
    the decode's own estimate (what the server reserves) is an upper bound."""
    side = 8000
    path = tmp_path / "huge.png"
    path.write_bytes(blank_png(side, side, bit_depth, 0, 117))
    out = subprocess.run([sys.executable, "-c", DECODE_IN_CHILD, str(path)], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    lines = out.stdout.splitlines()
    assert lines, out.stderr[-1000:]
    result = json.loads(lines[0])
    pixels = side * side
    bound = pixels * (stored_bytes + (1 if bit_depth == 16 else 0)) + 48 * MB
    assert result["used"] < bound, f"decoding used {result['used'] / MB:.0f} MB, bound {bound / MB:.0f} MB"
    assert abs(result["mean"] - (117 / 255 - 0.5) / 0.5) < 0.01  # the grey value survived
    assert out.returncode == 0, out.stderr[-1000:]
    assert result["used"] <= int(lines[1])  # the estimate the server reserves is an upper bound


def large_copy(photo_file, fmt: str, mode: str = "RGB") -> bytes:
    """A real photo upscaled to 2400x1800 (large enough to be reduced) and encoded in ``fmt``."""
    big = Image.open(photo_file).convert("RGB").resize((2400, 1800), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    big.convert(mode).save(buf, fmt, **({"compress_level": 1} if fmt == "PNG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize(
    "photo, fmt, mode",
    [("daisy", "PNG", "RGB"), ("tulip", "PNG", "RGBA"), ("daisy", "TIFF", "L")],
)
def test_reduced_decoding_matches_full_decoding(photo, fmt, mode):
    """Shrinking a large image by a whole factor right after decoding changes pixels
    by at most a few grey levels (2/255 measured) against resizing at full size."""
    f = sorted((FLOWERS / "daisy").glob("*.jpg"))[0] if photo == "daisy" else PREDICT / "classic-tulip.jpg"
    from imgclf.data.imaging import decode_bytes

    data = large_copy(f, fmt, mode)
    img = Image.open(io.BytesIO(data))
    assert decode_bytes(img, PREP.resize_to) < decode_bytes(img)  # the reduced path is taken
    fast, full = load_array(data, PREP), load_array(data, PREP, fast_decode=False)
    level = 1 / (255 * 0.5)  # one grey level after normalising with std 0.5
    assert np.abs(fast - full).max() <= 3 * level
    assert np.abs(fast - full).mean() < 0.3 * level


def test_reduction_keeps_transparency_and_orientation():
    """Alpha is averaged premultiplied (transparent pixels still turn white), and
    the EXIF orientation is applied after the reduction."""
    half = Image.new("RGBA", (4000, 1600), (0, 0, 0, 0))
    half.paste((200, 30, 30, 255), (0, 0, 2000, 1600))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    half.save(buf, "PNG", exif=exif, compress_level=1)
    img = open_image(buf.getvalue(), draft_size=256)
    assert img.size == (800, 2000)  # reduced by 2, then upright
    full = open_image(buf.getvalue())
    assert full.size == (1600, 4000)
    assert img.getpixel((400, 5)) == full.getpixel((800, 5)) == (200, 30, 30)
    assert img.getpixel((img.size[0] // 2, img.size[1] - 5)) == (255, 255, 255)


def test_wide_grey_conversion_is_unchanged():
    """16- and 32-bit grey become 8 bits exactly as the float64 formula did (now by
    table, a strip at a time): every 16-bit value checked."""
    from imgclf.data.imaging import _wide_grey_to_8bit

    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    expected = np.clip(values.astype(np.float64) * (255.0 / 65535.0), 0, 255).astype(np.uint8)
    assert (np.asarray(_wide_grey_to_8bit(Image.fromarray(values))) == expected).all()
    as_int32 = Image.fromarray(values.astype(np.int32) - 1000)  # mode I, negatives clip to 0
    expected32 = np.clip((values.astype(np.float64) - 1000) * (255.0 / 65535.0), 0, 255).astype(np.uint8)
    assert (np.asarray(_wide_grey_to_8bit(as_int32)) == expected32).all()
    small = Image.fromarray(np.arange(256, dtype=np.int32).reshape(16, 16))  # mode I within 0..255: taken as 8-bit
    assert (np.asarray(_wide_grey_to_8bit(small)) == np.arange(256).reshape(16, 16)).all()


def test_pixel_limit_is_an_option_and_checked_from_the_header():
    data = blank_png(12000, 12000, 16)
    with pytest.raises(ImageTooLargeError, match="huge.png: image is 12000x12000, more pixels than the 50,000,000"):
        open_image(data, "huge.png", max_pixels=50_000_000)
    assert open_image(blank_png(40, 30), max_pixels=1200).size == (40, 30)
    with pytest.raises(ImageTooLargeError, match="1,199 allowed"):
        load_array(blank_png(40, 30), PREP, max_pixels=1199)


def test_reserve_hook_gets_the_estimate_and_its_refusal_names_the_file():
    from imgclf.data.imaging import decode_bytes

    seen = []

    class Reserve:
        def __init__(self, nbytes):
            seen.append(nbytes)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    data = blank_png(3000, 2000, 8, 2)
    load_array(data, PREP, "a.png", reserve=Reserve)
    img = Image.open(io.BytesIO(data))
    assert seen and seen[0] >= decode_bytes(img, PREP.resize_to) > 3000 * 2000 * 4

    def refuse(nbytes):
        raise ImageTooLargeError(f"needs {nbytes} bytes")

    with pytest.raises(ImageTooLargeError, match=r"^b.png: needs \d+ bytes"):
        load_array(data, PREP, "b.png", reserve=refuse)
