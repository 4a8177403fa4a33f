"""The web API under load: today's engine against the default one, batching on and off, in one run.

Starts `imgclf serve` on loopback three times with one model (trained on the
bundled flowers as `imgclf train` does: held-out split, int8 calibrated on the
training images, held-out metrics per precision): ONNX Runtime fp32 (the engine
before OpenVINO), the default (`--engine auto --precision auto`, the fastest the
model's recorded accuracy allows here), and the default with `--max-batch 1`.
Drives each with concurrent clients posting the bundled flower photos as raw
image bodies, and prints requests/s, latency percentiles, errors and the
server's resident memory before and after.

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


def drive(model: Path, options: tuple[str, ...], requests: int, clients: int, photos: list[bytes]) -> dict:
    with serve_in_subprocess(model, *options) as (url, server):
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
    parser.add_argument("--model", help="model file to serve (default: train on the flowers, as imgclf train does)")
    args = parser.parse_args()
    photos = [f.read_bytes() for f in sorted(sample_data_dir("flowers").glob("*/*.jpg"))]
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else None
        if model is None:
            images = load_images_from_directory(sample_data_dir("flowers"))
            trainer = ImageClassificationTrainer(workspace=f"{tmp}/ws", progress=False)
            trained, held_out = trainer.fit_and_hold_out(images)
            trained.info["metrics"] = trained.evaluate(held_out).to_dict()
            model = trained.save(f"{tmp}/flowers.imgclf")
        from imgclf.inference.loading import load_predictor

        default = load_predictor(model).engine_choice().describe()
        print(f"{args.requests} requests, {args.clients} concurrent clients, model {model.name}")
        print(f"default here: {default}\n")
        print(f"{'mode':<34} {'req/s':>7} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'errors':>6} {'RSS before':>10} "
              f"{'RSS after':>9}")  # fmt: skip
        results = {}
        modes = {"onnxruntime fp32, batching (16)": ("--engine", "onnxruntime", "--precision", "fp32"),
                 "default, batching (16)": (), "default, --max-batch 1": ("--max-batch", "1")}  # fmt: skip
        for mode, options in modes.items():
            r = results[mode] = drive(model, options, args.requests, args.clients, photos)
            print(f"{mode:<34} {r['rps']:>7.1f} {r['p50']:>7.1f} {r['p95']:>7.1f} {r['p99']:>7.1f} {r['errors']:>6d} "
                  f"{r['rss_before']:>8.0f}MB {r['rss_after']:>7.0f}MB", flush=True)  # fmt: skip
        rps = {m: r["rps"] for m, r in results.items()}
        print(
            f"\ndefault / onnxruntime fp32: {rps['default, batching (16)'] / rps['onnxruntime fp32, batching (16)']:.2f}x"
            f" requests/s; batching / no batching: {rps['default, batching (16)'] / rps['default, --max-batch 1']:.2f}x"
        )


if __name__ == "__main__":
    main()
