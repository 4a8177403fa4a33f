"""Accuracy and wall time of each ``--quality`` preset, by stratified k-fold CV.

On brain-mri-600 (not shipped; default ../shared/data/brain-mri-600) and the bundled flowers:
for each fold, ``fast``, ``balanced`` (at its default time limit) and ``best`` train on the other
folds' photos and are scored on the fold's; every photo is tested exactly once. A row gives each
preset's held-out accuracy and seconds (training, as ``fit`` runs it), what ``balanced`` chose
and the time it announced; each row is also appended as JSON to ``--log``, so a long run that
is stopped keeps its folds. ``--limit-check`` instead trains ``best`` on one brain fold with a
short ``--time-limit`` and reports the wall time against it.

    python benchmarks/presets.py                       # both sets, 5 folds, all presets (about 90 min on 2 cores)
    python benchmarks/presets.py --set flowers         # the flowers alone
    python benchmarks/presets.py --limit-check 3m      # best, one brain fold, within 3 minutes?
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from accuracy import default_brain_path, load_set  # the brain set's location and loading, as accuracy.py finds them
from imgclf import ImageClassificationTrainer, stratified_folds
from imgclf.options import QUALITIES, parse_duration


def train_one(quality: str, train: list, test: list, workspace: str, seed: int, time_limit: str | None = None) -> dict:
    """One preset on one fold: accuracy, seconds, what it chose, and the lines it said."""
    started = time.perf_counter()
    model = ImageClassificationTrainer(quality=quality, time_limit=time_limit, seed=seed, workspace=workspace,
                                       progress=False).fit(train)  # fmt: skip
    seconds = time.perf_counter() - started
    info = model.info["quality"]
    tuned = model.info.get("fine_tune") or {}
    flipped = None
    if tuned:  # the same model with flip test-time augmentation: whether TTA would pay
        model.tta = True
        flipped = model.evaluate(test).micro_accuracy
        model.tta = False
    return {
        "quality": quality, "accuracy": model.evaluate(test).micro_accuracy, "seconds": round(seconds, 1),
        "accuracy_tta": flipped,
        "recipe": info["recipe"], "time_limit_s": info["time_limit_s"], "kept": tuned.get("kept"),
        "epochs": sum(1 for h in model.info["history"] if h["phase"] == "fine-tune"),
        "planned_epochs": tuned.get("planned_epochs"), "lines": info["lines"] + tuned.get("decisions", [])[-2:],
    }  # fmt: skip


def run_set(name: str, images: list, args) -> list[dict]:
    folds = stratified_folds(images, k=args.folds, seed=args.seed)
    chosen = [int(f) for f in args.only_folds.split(",")] if args.only_folds else range(1, args.folds + 1)
    qualities = args.quality.split(",")
    print(f"\n{name}: stratified {args.folds}-fold CV of {len(images)} photos, seed {args.seed}", flush=True)
    print("fold  " + "  ".join(f"{q:>8} {'s':>6}" for q in qualities) + "  balanced chose", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as ws:
        for i in chosen:
            train, test = folds[i - 1]
            results = {q: train_one(q, train, test, ws, args.seed) for q in qualities}
            row = {"set": name, "fold": i, **{q: r for q, r in results.items()}}
            rows.append(row)
            chose = results.get("balanced", {})
            said = f"{chose.get('recipe', '')}" + (f", {chose['epochs']} epochs, kept {chose['kept']}"
                                                   if chose.get("kept") else "")  # fmt: skip
            print(f"{i:>4}  " + "  ".join(f"{results[q]['accuracy']:>8.4f} {results[q]['seconds']:>6.1f}"
                                          for q in qualities) + f"  {said}", flush=True)  # fmt: skip
            if args.log:
                with open(args.log, "a") as f:
                    f.write(json.dumps(row) + "\n")
    for q in qualities:
        scores = [r[q]["accuracy"] for r in rows]
        std = statistics.stdev(scores) if len(scores) > 1 else 0.0
        gain = 100 * (statistics.mean(scores) - statistics.mean(r["fast"]["accuracy"] for r in rows)) if "fast" in qualities else 0  # fmt: skip
        print(f"{q:<9} mean {statistics.mean(scores):.4f}  std {std:.4f}  min {min(scores):.4f}  "
              f"{statistics.mean(r[q]['seconds'] for r in rows):7.1f} s a fold  {gain:+.1f} points over fast")  # fmt: skip
    return rows


def limit_check(args) -> None:
    """``best`` on brain fold 1 with a short time limit: the wall time of ``fit`` against it."""
    images = load_set("brain", args.brain_path)
    train, test = stratified_folds(images, k=args.folds, seed=args.seed)[0]
    limit = parse_duration(args.limit_check)
    with tempfile.TemporaryDirectory() as ws:
        ImageClassificationTrainer(quality="fast", workspace=ws, progress=False).fit(
            train
        )  # features cached, as on a second run
        r = train_one("best", train, test, ws, args.seed, time_limit=args.limit_check)
    print(json.dumps(r, indent=1))
    print(f"time limit {limit:.0f} s: fit took {r['seconds']:.1f} s ({100 * r['seconds'] / limit:.1f}% of it), "
          f"{r['epochs']} of 10 epochs, accuracy {r['accuracy']:.4f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=("both", "brain", "flowers"), default="both")
    parser.add_argument("--quality", default=",".join(QUALITIES), help="comma-separated presets (fast must come first)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--only-folds", help="e.g. 1,2 (default: all)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--brain-path", type=Path, default=default_brain_path())
    parser.add_argument("--log", help="append each fold's row as JSON to this file")
    parser.add_argument("--limit-check", metavar="DURATION", help="only: best on one brain fold within DURATION")
    args = parser.parse_args()
    if args.limit_check:
        limit_check(args)
        return
    for name in ("brain", "flowers") if args.set == "both" else (args.set,):
        run_set(name, load_set(name, args.brain_path), args)


if __name__ == "__main__":
    main()
