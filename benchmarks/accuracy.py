"""Accuracy of default training on the bundled flowers, by stratified 5-fold CV.

The 40-image test split alone is too noisy to judge by, so every image is
tested exactly once across 5 folds. Also times the default `imgclf train`
(fresh workspace, whole process) on this machine.

    python benchmarks/accuracy.py [--folds 5] [--seed 1]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from imgclf import ImageClassificationTrainer, load_images_from_directory, sample_data_dir, stratified_folds


def cross_validate(folds: int, seed: int, workspace: Path, **options) -> list[float]:
    images = load_images_from_directory(sample_data_dir("flowers"))
    scores = []
    for i, (train, test) in enumerate(stratified_folds(images, k=folds, seed=seed), 1):
        started = time.perf_counter()
        model = ImageClassificationTrainer(seed=seed, workspace=workspace, progress=False, **options).fit(train)
        acc = model.evaluate(test).micro_accuracy
        scores.append(acc)
        print(f"  fold {i}: accuracy {acc:.4f}  ({time.perf_counter() - started:.1f} s)")
    return scores


def time_default_train() -> tuple[float, str]:
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-m", "imgclf.cli", "train", "-q", "--workspace", f"{tmp}/ws", "--out", f"{tmp}/m.imgclf"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        wall = time.perf_counter() - started
    acc = next(line for line in out.stdout.splitlines() if "micro accuracy" in line).split()[-1]
    return wall, acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as ws:
        print(f"Head-only (default options), stratified {args.folds}-fold CV on 200 flower photos:")
        scores = cross_validate(args.folds, args.seed, Path(ws))
    print(f"mean accuracy {statistics.mean(scores):.4f}  std {statistics.stdev(scores):.4f}  "
          f"min {min(scores):.4f}  max {max(scores):.4f}")  # fmt: skip
    wall, acc = time_default_train()
    print(f"default `imgclf train` (fresh workspace, whole process): {wall:.1f} s wall, held-out accuracy {acc}")


if __name__ == "__main__":
    main()
