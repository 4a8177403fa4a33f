"""Images made on the fly, for tests and benchmarks: decompression bombs and huge flat PNGs
that cost a few hundred KB on disk but gigabytes once decoded, and multi-label mosaics of
real photos."""

from __future__ import annotations

import struct
import zlib

MB = 1024 * 1024


def blank_png(width: int, height: int, bit_depth: int = 8, colour_type: int = 0, value: int = 0) -> bytes:
    """A valid PNG of one flat colour, as small as such a file gets (a 12000x12000
    16-bit one is about 300 KB), made in a fraction of a second: one block of rows
    is compressed once and repeated (each ends with a full flush, so the copies are
    independent), and the checksum is computed over the whole."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    row = b"\x00" + bytes([value]) * (width * channels * bit_depth // 8)
    per_block = max(1, MB // len(row))
    block = row * per_block
    blocks, rest = divmod(height, per_block)
    compressor = zlib.compressobj(9)
    first = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    end = compressor.compress(row * rest) + compressor.flush()
    adler = 1
    for _ in range(blocks):
        adler = zlib.adler32(block, adler)
    adler = zlib.adler32(row * rest, adler)
    idat = first[:2] + first[2:] * blocks + end[:-4] + struct.pack(">I", adler)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def write_mosaics(dest, photos: dict, count: int, seed: int, prefix: str, tile: int = 224) -> list[tuple[str, str]]:
    """``count`` side-by-side mosaics of two photos of different labels, for multi-label tests
    and benchmarks: each pair of labels equally often, each side at random, each photo resized
    to ``tile`` x ``tile`` (bicubic); written as JPEG under ``dest``; returns (file name, "a;b") rows."""
    import random
    from itertools import combinations

    from PIL import Image

    rng = random.Random(seed)
    pairs = list(combinations(sorted(photos), 2))
    rows = []
    for i in range(count):
        a, b = pairs[i % len(pairs)]
        left, right = (a, b) if rng.random() < 0.5 else (b, a)
        mosaic = Image.new("RGB", (2 * tile, tile))
        for x, label in ((0, left), (tile, right)):
            with Image.open(rng.choice(photos[label])) as photo:
                mosaic.paste(photo.convert("RGB").resize((tile, tile), Image.Resampling.BICUBIC), (x, 0))
        name = f"{prefix}-{i:04d}.jpg"
        mosaic.save(dest / name, quality=90)
        rows.append((name, f"{a};{b}"))
    return rows
