"""One model, one answer: the largest probability difference between prediction paths.

    python benchmarks/consistency.py [--model flowers.imgclf]

Trains the default model on the bundled flowers (or takes ``--model``), then scores the
same photos through the CLI at 4, 300 and 1,800 images (``--json`` and ``--out``), the
exported ``.onnx``, and Python one image at a time, and prints, per path, the engine and
precision it ran and the largest difference from ``predict_batch`` (the contract: 1e-4).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "imgclf", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    return done.stdout


def main() -> None:
    from imgclf import ImageClassificationTrainer, load_images_from_directory, load_model
    from imgclf.sample_data import sample_data_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    args = parser.parse_args()
    photos = sorted(sample_data_dir("flowers").glob("*/*.jpg")) + sorted(sample_data_dir("predict").glob("*g"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model or f"{tmp}/m.imgclf")
        if not args.model:
            model, _ = ImageClassificationTrainer(workspace=f"{tmp}/ws", progress=False).fit_and_hold_out(
                load_images_from_directory(sample_data_dir("flowers")))
            model.save(path)
        model = load_model(path)
        labels = model.labels
        reference = {f.name: np.array([p.scores[k] for k in labels]) for f, p in zip(photos, model.predict_batch(photos))}

        def worst(rows: dict[str, dict]) -> float:
            return max(float(np.abs(np.array([s[k] for k in labels]) - reference[Path(n).name.split("~")[-1]]).max())
                       for n, s in rows.items())  # fmt: skip

        table = [("python predict, 1 image a call", model.engine_choice(1),
                  worst({f.name: model.predict(f).scores for f in photos[:20]}))]  # fmt: skip
        for size in (4, 300, 1800):
            folder = Path(tmp, f"job{size}")
            folder.mkdir()
            for i in range(size):
                os.link(photos[i % len(photos)], folder / f"{i:05d}~{photos[i % len(photos)].name}")
            rows = json.loads(cli("predict", str(path), str(folder), "--json", "--top-k", str(len(labels))))
            ran = f"{rows[0]['engine']} {rows[0]['precision']}"
            table.append((f"predict --json, {size} images", ran,
                          worst({r["file"]: {s["label"]: s["probability"] for s in r["scores"]} for r in rows})))  # fmt: skip
        out = Path(tmp, "r.jsonl")
        cli("predict", str(path), str(Path(tmp, "job1800")), "--out", str(out), "-q", "--top-k", str(len(labels)))
        rows = [json.loads(line) for part in sorted(out.glob("part-*")) for line in part.open()]
        ran = json.loads((out / "_imgclf.json").read_text())["ran"]
        table.append(("predict --out, 1800 images", f"{ran['engine']} {ran['precision']}",
                      worst({r["path"]: dict(zip(r["top_labels"], r["top_probabilities"])) for r in rows})))  # fmt: skip
        onnx = Path(tmp, "m.onnx")
        cli("export", str(path), "--out", str(onnx))
        rows = json.loads(cli("predict", str(onnx), *map(str, photos), "--json", "--top-k", str(len(labels))))
        table.append((f"exported .onnx --json, {len(photos)} images", f"{rows[0]['engine']} {rows[0]['precision']}",
                      worst({r["file"]: {s["label"]: s["probability"] for s in r["scores"]} for r in rows})))  # fmt: skip
    print(f"{'path':<36} {'ran':<22} {'largest difference':>18}")
    for name, ran, diff in table:
        ran = ran if isinstance(ran, str) else f"{ran.engine} {ran.precision}"
        print(f"{name:<36} {ran:<22} {diff:>18.2e}")


if __name__ == "__main__":
    main()
