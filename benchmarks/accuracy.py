"""Accuracy on the bundled flowers by stratified 5-fold cross-validation.

The 40-image test split alone is too noisy to judge by, so every image is
tested exactly once across 5 folds. Head-only training (the default) always
runs; with ``--fine-tune`` each fold is also fine-tuned with default fine-tune
options, side by side in the same run, with the time per fold. Also times the
default `imgclf train` (fresh workspace, whole process).

    python benchmarks/accuracy.py [--fine-tune] [--folds 5] [--seed 1]
    python benchmarks/accuracy.py --fine-tune --options '{"unfreeze": 5, "epochs": 15}'
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

from imgclf import (
    FineTuneOptions,
    ImageClassificationTrainer,
    load_images_from_directory,
    sample_data_dir,
    stratified_folds,
)


def summary(name: str, scores: list[float]) -> str:
    return (f"{name:<22} mean {statistics.mean(scores):.4f}  std {statistics.stdev(scores):.4f}  "
            f"min {min(scores):.4f}  max {max(scores):.4f}")  # fmt: skip


def wrong_names(model, test) -> set[str]:
    """The test photos ``model`` labels wrongly."""
    predictions = model.predict_batch([im.source for im in test])
    return {im.name for im, p in zip(test, predictions, strict=True) if p.label != im.label}


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
    parser.add_argument("--fine-tune", action="store_true", help="also fine-tune each fold (default options)")
    parser.add_argument("--tta", action="store_true", help="flip test-time augmentation for the fine-tuned model")
    parser.add_argument("--options", type=json.loads, default={},
                        help="FineTuneOptions fields as JSON, to compare a recipe with the defaults")  # fmt: skip
    args = parser.parse_args()
    options = FineTuneOptions(**args.options)
    if args.fine_tune:
        print(f"fine-tune options: {args.options or 'defaults'}")
    images = load_images_from_directory(sample_data_dir("flowers"))
    head_scores, tuned_scores = [], []
    head_wrong: set[str] = set()
    tuned_wrong: set[str] = set()
    print(f"Stratified {args.folds}-fold CV on {len(images)} flower photos:")
    with tempfile.TemporaryDirectory() as ws:
        for i, (train, test) in enumerate(stratified_folds(images, k=args.folds, seed=args.seed), 1):
            started = time.perf_counter()
            head = ImageClassificationTrainer(seed=args.seed, workspace=ws, progress=False).fit(train)
            head_scores.append(head.evaluate(test).micro_accuracy)
            line = f"  fold {i}: head-only {head_scores[-1]:.4f} ({time.perf_counter() - started:.1f} s)"
            head_wrong |= wrong_names(head, test)
            if args.fine_tune:
                started = time.perf_counter()
                tuned = ImageClassificationTrainer(seed=args.seed, workspace=ws, progress=False, fine_tune=True,
                                                   fine_tune_options=options, tta=args.tta).fit(train)  # fmt: skip
                tuned_scores.append(tuned.evaluate(test).micro_accuracy)
                line += f"   fine-tune {tuned_scores[-1]:.4f} ({time.perf_counter() - started:.1f} s)"
                tuned_wrong |= wrong_names(tuned, test)
            print(line, flush=True)
    print(summary("head-only", head_scores))
    if tuned_scores:
        print(summary("fine-tune" + (" + TTA" if args.tta else ""), tuned_scores))
        gain = statistics.mean(tuned_scores) - statistics.mean(head_scores)
        print(f"fine-tune gain over head-only: {100 * gain:+.1f} points")
        print(
            f"photos wrong: both {len(head_wrong & tuned_wrong)}, only head-only {len(head_wrong - tuned_wrong)}, "
            f"only fine-tune {len(tuned_wrong - head_wrong)} (of {len(images)})"
        )
    wall, acc = time_default_train()
    print(f"default `imgclf train` (fresh workspace, whole process): {wall:.1f} s wall, held-out accuracy {acc}")


if __name__ == "__main__":
    main()
