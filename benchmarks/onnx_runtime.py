"""The portable model: cold start and throughput of torch vs ONNX, and int8.

Trains the default model on the bundled flowers (80/20 split), exports it to
ONNX (float32 and int8), then measures, each in a fresh process:
  cold start   process start -> first prediction printed (`imgclf predict` on one image)
  throughput   images/s of `imgclf predict` over all 200 bundled photos (whole process)
and the held-out accuracy of each file.

    python benchmarks/onnx_runtime.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time

from imgclf import ImageClassificationTrainer, load_images_from_directory, sample_data_dir, train_test_split


def timed(argv: list[str], runs: int = 3) -> float:
    """Median wall seconds of a whole `imgclf` process."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "imgclf.cli", *argv], check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    from imgclf.inference.runtime import load_onnx_model

    images = load_images_from_directory(sample_data_dir("flowers"))
    train, test = train_test_split(images, 0.2, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        model = ImageClassificationTrainer(workspace=f"{tmp}/ws", progress=False).fit(train)
        files = {"torch (.imgclf)": model.save(f"{tmp}/m.imgclf")}
        files["onnx float32"] = model.export_onnx(f"{tmp}/m.onnx")
        files["onnx int8"] = model.export_onnx(f"{tmp}/m8.onnx", quantize="int8")
        one = str(sample_data_dir("predict") / "classic-daisy.jpg")
        folder = str(sample_data_dir("flowers"))
        print(f"{'model file':<17} {'size MB':>7} {'cold start s':>12} {'200 images s':>12} {'img/s':>6} "
              f"{'held-out acc':>12}")  # fmt: skip
        for name, path in files.items():
            predictor = model if path.suffix == ".imgclf" else load_onnx_model(path)
            acc = predictor.evaluate(test).micro_accuracy
            cold = timed(["predict", str(path), one])
            whole = timed(["predict", str(path), folder], runs=1)
            print(f"{name:<17} {path.stat().st_size / 1e6:>7.1f} {cold:>12.2f} {whole:>12.2f} "
                  f"{200 / whole:>6.1f} {acc:>12.4f}")  # fmt: skip
        print("\n(whole-process times: interpreter start, imports, model load, decoding and prediction)")


if __name__ == "__main__":
    main()
