"""The server's memory under huge-dimension uploads, one at a time.

Starts `imgclf serve` (a model trained on the bundled flowers and exported to ONNX,
or --model) with the given serve options, posts flat PNGs of a few hundred KB that
decode to tens or hundreds of megapixels, and prints for each the answer, its time,
and the server's resident memory before, at its peak (sampled every 3 ms) and after.

    python benchmarks/serve_memory.py [--model FILE] [--options "--max-pixels 150000000"]
"""

from __future__ import annotations

import argparse
import shlex
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

from imgclf.serve.process import serve_in_subprocess
from imgclf.testing import blank_png

MB = 1024 * 1024
UPLOADS = [  # name, width, height, bit depth, PNG colour type
    ("12000x12000 16-bit grey", 12000, 12000, 16, 0),
    ("12000x12000 8-bit grey", 12000, 12000, 8, 0),
    ("7000x7000 16-bit grey", 7000, 7000, 16, 0),
    ("7000x7000 8-bit RGB", 7000, 7000, 8, 2),
]


def measure(url: str, process: psutil.Process, data: bytes) -> tuple[int, float, int, int, int]:
    rest = process.memory_info().rss
    peak, done = [rest], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.003)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    r = httpx.post(f"{url}/v1/predict", content=data, headers={"content-type": "image/png"}, timeout=600)
    seconds = time.perf_counter() - started
    time.sleep(0.5)
    done.set()
    sampler.join()
    return r.status_code, seconds, rest, peak[0], process.memory_info().rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model file to serve (default: train on the flowers and export ONNX)")
    parser.add_argument("--options", default="", help="extra `imgclf serve` options, quoted as one string")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else None
        if model is None:
            from imgclf import ImageClassificationTrainer, load_images_from_directory, sample_data_dir

            images = load_images_from_directory(sample_data_dir("flowers"))
            trained = ImageClassificationTrainer(workspace=f"{tmp}/ws", progress=False).fit(images)
            model = trained.export_onnx(f"{tmp}/flowers.onnx")
        with serve_in_subprocess(model, *shlex.split(args.options)) as (url, server):
            process = psutil.Process(server.pid)
            httpx.get(f"{url}/v1/model")
            print(f"imgclf serve {model.name} {args.options}".rstrip())
            print(f"{'upload':<26} {'KB':>5} {'status':>6} {'seconds':>7} {'RSS before':>10} {'peak':>8} {'after':>8}")
            for name, width, height, depth, colour in UPLOADS:
                data = blank_png(width, height, depth, colour, 117)
                status, seconds, rest, peak, after = measure(url, process, data)
                print(f"{name:<26} {len(data) // 1024:>5} {status:>6} {seconds:>7.1f} {rest / MB:>8.0f}MB "
                      f"{peak / MB:>6.0f}MB {after / MB:>6.0f}MB")  # fmt: skip


if __name__ == "__main__":
    main()
