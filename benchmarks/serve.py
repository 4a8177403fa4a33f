"""The web API under load: batching on against `--max-batch 1`, in one run.

Starts `imgclf serve` on loopback twice (a model trained on the bundled flowers,
exported to ONNX by default), drives each with concurrent clients posting the
bundled flower photos as raw image bodies, and prints requests/s, latency
percentiles, errors and the server's resident memory before and after.

    python benchmarks/serve.py [--requests 2000] [--clients 16] [--model FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from imgclf import ImageClassificationTrainer, load_images_from_directory, sample_data_dir
from imgclf.serve.process import serve_in_subprocess


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def drive(model: Path, max_batch: int, requests: int, clients: int, photos: list[bytes]) -> dict:
    with serve_in_subprocess(model, "--max-batch", str(max_batch)) as (url, server):
        with httpx.Client(timeout=30) as warm:  # warm-up, not counted
            for p in photos[:32]:
                warm.post(f"{url}/v1/predict", content=p, headers={"content-type": "image/jpeg"})
        before = rss_mb(server.pid)
        latencies: list[float] = []
        errors = [0]
        counter = iter(range(requests))

        async def client(http: httpx.AsyncClient) -> None:
            for i in counter:  # clients share one counter: exactly `requests` in all
                t = time.perf_counter()
                try:
                    r = await http.post(f"{url}/v1/predict", content=photos[i % len(photos)],
                                        headers={"content-type": "image/jpeg"})  # fmt: skip
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - t)
                errors[0] += not ok

        async def load() -> float:
            limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
            async with httpx.AsyncClient(timeout=60, limits=limits) as http:
                started = time.perf_counter()
                await asyncio.gather(*(client(http) for _ in range(clients)))
                return time.perf_counter() - started

        wall = asyncio.run(load())
        after = rss_mb(server.pid)
    q = statistics.quantiles(latencies, n=100)
    return {"rps": requests / wall, "p50": q[49] * 1000, "p95": q[94] * 1000, "p99": q[98] * 1000,
            "errors": errors[0], "rss_before": before, "rss_after": after}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--model", help="model file to serve (default: train on the flowers and export ONNX)")
    args = parser.parse_args()
    photos = [f.read_bytes() for f in sorted(sample_data_dir("flowers").glob("*/*.jpg"))]
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else None
        if model is None:
            images = load_images_from_directory(sample_data_dir("flowers"))
            trained = ImageClassificationTrainer(workspace=f"{tmp}/ws", progress=False).fit(images)
            model = trained.export_onnx(f"{tmp}/flowers.onnx")
        print(f"{args.requests} requests, {args.clients} concurrent clients, model {model.name}\n")
        print(f"{'mode':<16} {'req/s':>7} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'errors':>6} {'RSS before':>10} "
              f"{'RSS after':>9}")  # fmt: skip
        results = {}
        for mode, max_batch in (("batching (16)", 16), ("--max-batch 1", 1)):
            r = results[mode] = drive(model, max_batch, args.requests, args.clients, photos)
            print(f"{mode:<16} {r['rps']:>7.1f} {r['p50']:>7.1f} {r['p95']:>7.1f} {r['p99']:>7.1f} {r['errors']:>6d} "
                  f"{r['rss_before']:>8.0f}MB {r['rss_after']:>7.0f}MB")  # fmt: skip
        ratio = results["batching (16)"]["rps"] / results["--max-batch 1"]["rps"]
        print(f"\nbatching / no batching: {ratio:.2f}x requests/s")


if __name__ == "__main__":
    main()
