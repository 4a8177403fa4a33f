"""Accuracy of head-only training and of the default fine-tune, by stratified k-fold CV.

Two sets: the bundled flowers (like ImageNet) and brain-mri-600 (MRI slices, unlike
it; not shipped, default path ../shared/data/brain-mri-600 from the repository
root). Every photo is tested exactly once; head-only and fine-tune train on the
same folds, side by side in one run. Prints the per-fold table (accuracy, seconds,
what the fine-tune kept), mean and standard deviation, the process's peak RSS, and
fine-tune training images/s of today's recipe against the previous one (the
recipe shipped before the adaptive default: 224 px, whole backbone), measured
alternately on the same photos in the same run.

    python benchmarks/accuracy.py                          # both sets, 5 folds, fine-tune too
    python benchmarks/accuracy.py --set brain --only-folds 1,2   # part of a run (e.g. under a time limit)
    python benchmarks/accuracy.py --set flowers --options '{"backbone_lr_ratio": 1.0}'   # compare a recipe
    python benchmarks/accuracy.py --set brain --throughput-only
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from imgclf import (
    FineTuneOptions,
    ImageClassificationTrainer,
    load_images_from_directory,
    sample_data_dir,
    stratified_folds,
)

REPO = Path(__file__).resolve().parent.parent


def default_brain_path() -> Path:
    """../shared/data/brain-mri-600 from the repository root, or from a folder above
    it (a git worktree sits one level deeper than the main checkout)."""
    for folder in REPO.parents:
        candidate = folder / "shared" / "data" / "brain-mri-600"
        if candidate.is_dir():
            return candidate
    return REPO.parent / "shared" / "data" / "brain-mri-600"


# The fine-tune recipe shipped before the adaptive default, for the throughput comparison.
PREVIOUS = FineTuneOptions(epochs=10, backbone_lr_ratio=0.2, layer_decay=0.85, batch_norm="frozen",
                           randaugment_magnitude=7, min_crop=0.3, color_augment=True, train_size=224,
                           frozen_blocks=0, validation_fraction=0)  # fmt: skip


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def summary(name: str, scores: list[float]) -> str:
    std = statistics.stdev(scores) if len(scores) > 1 else 0.0
    return (f"{name:<10} mean {statistics.mean(scores):.4f}  std {std:.4f}  "
            f"min {min(scores):.4f}  max {max(scores):.4f}")  # fmt: skip


def wrong_names(model, test) -> set[str]:
    """The test photos ``model`` labels wrongly."""
    predictions = model.predict_batch([im.source for im in test])
    return {im.name for im, p in zip(test, predictions, strict=True) if p.label != im.label}


def epoch_printer(verbose: bool):
    """With --verbose, each fine-tune epoch's metrics as it ends."""
    if not verbose:
        return None
    return lambda m: print(f"        {m}", flush=True) if m.phase == "fine-tune" else None


def load_set(name: str, brain_path: Path) -> list:
    if name == "flowers":
        return load_images_from_directory(sample_data_dir("flowers"))
    if not brain_path.is_dir():
        sys.exit(f"{brain_path}: brain-mri-600 not found; pass --brain-path DIR (a folder with one subfolder "
                 "per label), or run with --set flowers")  # fmt: skip
    return load_images_from_directory(brain_path)


def run_folds(name: str, images: list, args, options: FineTuneOptions | None, log_file) -> dict:
    """Head-only and fine-tune on each fold; prints one row per fold."""
    folds = stratified_folds(images, k=args.folds, seed=args.seed)
    chosen = [int(f) for f in args.only_folds.split(",")] if args.only_folds else range(1, args.folds + 1)
    rows = []
    wrong: dict[str, set[str]] = {"head": set(), "tuned": set()}
    print(f"\n{name}: stratified {args.folds}-fold CV of {len(images)} photos, seed {args.seed}")
    print(f"{'fold':>4}  {'head-only':>9} {'s':>6}  {'fine-tune':>9} {'s':>6}  {'fold s':>6}  {'kept':<16} "
          f"{'ft img/s':>8} {'peak RSS':>9}")  # fmt: skip
    with tempfile.TemporaryDirectory() as ws:
        for i in chosen:
            train, test = folds[i - 1]
            started = time.perf_counter()
            head = ImageClassificationTrainer(seed=args.seed, workspace=ws, progress=False).fit(train)
            row = {"set": name, "fold": i, "head": head.evaluate(test).micro_accuracy}
            row["head_s"] = time.perf_counter() - started
            wrong["head"] |= wrong_names(head, test)
            text = f"{i:>4}  {row['head']:>9.4f} {row['head_s']:>6.1f}"
            if options is not None:
                started = time.perf_counter()
                tuned = ImageClassificationTrainer(seed=args.seed, workspace=ws, progress=False, fine_tune=True,
                                                   fine_tune_options=options, tta=args.tta,
                                                   metrics_callback=epoch_printer(args.verbose)).fit(train)  # fmt: skip
                row["tuned"] = tuned.evaluate(test).micro_accuracy
                row["tuned_s"] = time.perf_counter() - started
                info = tuned.info["fine_tune"]
                row["kept"] = (
                    info["kept"] if info["kept"] == "head-only" else f"epoch {tuned.info['training']['best_epoch']}"
                )
                row["epochs_run"] = sum(1 for h in tuned.info["history"] if h["phase"] == "fine-tune")
                row["ips"] = info["train_images_per_second"]
                row["recipe"] = info["recipe"]
                wrong["tuned"] |= wrong_names(tuned, test)
                kept = f"{row['kept']} of {row['epochs_run']}"
                text += (f"  {row['tuned']:>9.4f} {row['tuned_s']:>6.1f}  {row['head_s'] + row['tuned_s']:>6.1f}  "
                         f"{kept:<16} {row['ips'] or 0:>8.1f}")  # fmt: skip
            row["peak_rss_mb"] = peak_rss_mb()
            print(f"{text} {row['peak_rss_mb']:>7.0f} MB", flush=True)
            rows.append(row)
            if log_file:
                with open(log_file, "a") as f:
                    f.write(json.dumps({**row, "options": args.options, "seed": args.seed}) + "\n")
    heads = [r["head"] for r in rows]
    print(summary("head-only", heads) + f"  {statistics.mean(r['head_s'] for r in rows):.1f} s a fold")
    if options is not None:
        tuned = [r["tuned"] for r in rows]
        print(summary("fine-tune", tuned) + f"  {statistics.mean(r['tuned_s'] for r in rows):.1f} s a fold")
        print(f"fine-tune gain over head-only: {100 * (statistics.mean(tuned) - statistics.mean(heads)):+.1f} points; "
              f"head + fine-tune {statistics.mean(r['head_s'] + r['tuned_s'] for r in rows):.1f} s a fold (mean)")  # fmt: skip
        print(f"photos wrong: both {len(wrong['head'] & wrong['tuned'])}, only head-only "
              f"{len(wrong['head'] - wrong['tuned'])}, only fine-tune {len(wrong['tuned'] - wrong['head'])}")  # fmt: skip
        print(f"decisions (last fold): {'; '.join(info['decisions'][1:-1])}")
    return {"rows": rows}


def throughput(images: list, n: int, rounds: int, seed: int) -> None:
    """Fine-tune training images/s, previous recipe against today's default, one
    epoch of ``n`` photos each, alternated ``rounds`` times (the machine's load hits both)."""
    import numpy as np
    import torch

    from imgclf.nets.archs import create_backbone, get_architecture, preprocessing_for
    from imgclf.training.finetune import FineTuner, decode_for_training

    arch = get_architecture("efficientnet_lite0")
    prep = preprocessing_for(arch)
    photos = images[:: max(1, len(images) // n)][:n]
    labels = sorted({im.label for im in images})
    y = np.array([labels.index(im.label) for im in photos], dtype=np.int64)
    pictures = decode_for_training(photos, prep)

    class Model:  # what FineTuner needs of a classifier
        def __init__(self):
            self.backbone, _ = create_backbone(arch)
            self.head = torch.nn.Linear(self.backbone.num_features, len(labels))
            self.preprocessing = prep

    tuners = {}
    for name, options in (("previous", PREVIOUS), ("today", FineTuneOptions())):
        tuner = FineTuner(Model(), options, device="cpu", seed=seed)
        tuners[name] = (tuner, *tuner.prepare(pictures, y))
    rates: dict[str, list[float]] = {name: [] for name in tuners}
    for r in range(rounds):
        for name, (tuner, loader, optimizer) in tuners.items():
            tuner.train_epoch(loader, optimizer, r, rounds * len(loader))
            rates[name].append(tuner.images_per_second[-1])
    print(
        f"\nfine-tune training throughput, {n} photos, {rounds} alternating epochs each (CPU, "
        f"{torch.get_num_threads()} threads):"
    )
    for name, (tuner, _, _) in tuners.items():
        r = tuner.recipe
        print(f"  {name:<8} {r.train_size} px, {'whole backbone' if tuner.o.frozen_blocks == 0 else f'stem + {tuner.o.frozen_blocks} blocks frozen'}, "
              f"batch norm {r.batch_norm}: median {statistics.median(rates[name]):.1f} img/s, best "
              f"{max(rates[name]):.1f}  ({', '.join(f'{v:.1f}' for v in rates[name])})")  # fmt: skip
    gain = statistics.median(rates["today"]) / statistics.median(rates["previous"])
    print(f"  today / previous: {gain:.2f}x (median), {max(rates['today']) / max(rates['previous']):.2f}x (best)")


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
    parser.add_argument("--set", choices=["flowers", "brain", "both"], default="both")
    parser.add_argument("--brain-path", type=Path, default=default_brain_path(),
                        help="brain-mri-600 (default: %(default)s)")  # fmt: skip
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--only-folds", help="run only these folds (1-based, comma-separated), e.g. 1,2")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--head-only", action="store_true", help="skip the fine-tune")
    parser.add_argument("--tta", action="store_true", help="flip test-time augmentation for the fine-tuned model")
    parser.add_argument("--options", type=json.loads, default={},
                        help="FineTuneOptions fields as JSON, to compare a recipe with the defaults")  # fmt: skip
    parser.add_argument("--log", help="append one JSON line per fold to this file")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every fine-tune epoch and decision")
    parser.add_argument("--throughput-photos", type=int, default=96)
    parser.add_argument("--throughput-rounds", type=int, default=3, help="0: skip the throughput comparison")
    parser.add_argument("--throughput-only", action="store_true")
    parser.add_argument("--default-train", action="store_true", help="also time the default `imgclf train`")
    args = parser.parse_args()
    if args.verbose:
        import logging

        logging.basicConfig(level=logging.INFO, format="        %(message)s", stream=sys.stdout)
    options = None if args.head_only else FineTuneOptions(**args.options)
    if options is not None:
        print(f"fine-tune options: {args.options or 'defaults'}")
    sets = ["flowers", "brain"] if args.set == "both" else [args.set]
    for name in sets:
        images = load_set(name, args.brain_path)
        if not args.throughput_only:
            run_folds(name, images, args, options, args.log)
        if args.throughput_rounds and (args.throughput_only or name == sets[-1]):
            throughput(images, args.throughput_photos, args.throughput_rounds, args.seed)
    if args.default_train:
        wall, acc = time_default_train()
        print(f"default `imgclf train` (fresh workspace, whole process): {wall:.1f} s wall, held-out accuracy {acc}")


if __name__ == "__main__":
    main()
