"""Multi-label training on mosaics of real photos: mean average precision and micro-F1 on held-out ones.

Each image is a 448x224 side-by-side mosaic of two photos of the bundled flowers (5 labels x 40)
from two different labels, labelled with both (``"daisy;tulips"`` in a manifest). Each round
holds the same 8 photos of every label out (a seeded draw): the training mosaics are made from
the other 32 of each, the held-out mosaics from the held-out photos only, so no photo of a
held-out mosaic was seen in training. Then ``imgclf train`` runs on the manifest (its ``split``
column holds the held-out mosaics out as given) and ``imgclf evaluate --json`` measures them,
once per preprocessing: ``--frame whole`` (the multi-label default: the whole mosaic at its 2:1
aspect, a 448x224 input) and ``--frame crop`` (the single-label centre crop, which cuts off the
outer halves of both photos).

    python benchmarks/multilabel.py            # 3 rounds (split seeds 1, 2, 3), 400 training mosaics
    python benchmarks/multilabel.py --quick    # one round
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from imgclf import sample_data_dir
from imgclf.testing import write_mosaics

REPO = Path(__file__).resolve().parent.parent
LABELS = ("daisy", "dandelion", "roses", "sunflowers", "tulips")
HELD_OUT = 8
SIDE = 224


def build_set(dest: Path, seed: int, train: int, test: int) -> Path:
    """The mosaics of one round and their manifest (``path,label,split``); returns the manifest."""
    flowers = sample_data_dir("flowers")
    rng = random.Random(seed)
    train_photos, test_photos = {}, {}
    for label in LABELS:
        files = sorted((flowers / label).glob("*.jpg"))
        rng.shuffle(files)
        test_photos[label], train_photos[label] = files[:HELD_OUT], files[HELD_OUT:]
    dest.mkdir(parents=True, exist_ok=True)
    rows = [(*r, "train") for r in write_mosaics(dest, train_photos, train, seed, "train")]
    rows += [(*r, "test") for r in write_mosaics(dest, test_photos, test, seed + 1000, "test")]
    manifest = dest / "mosaics.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    return manifest


def imgclf(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, "-m", "imgclf", *args], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"imgclf {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def one_round(seed: int, train: int, test: int, tmp: Path, arch: str = "efficientnet_lite0",
              frames: tuple[str, ...] = ("whole", "crop")) -> dict[str, dict]:  # fmt: skip
    manifest = build_set(tmp / f"round-{seed}", seed, train, test)
    workspace = tmp / "workspace"  # shared: each preprocessing has its own cached features
    found = {}
    for frame in frames:
        model = tmp / f"round-{seed}-{frame}.imgclf"
        started = time.perf_counter()
        imgclf("train", str(manifest), "--out", str(model), "--frame", frame, "--workspace", str(workspace),
               "--seed", str(seed), "--arch", arch, "--quiet")  # fmt: skip
        seconds = time.perf_counter() - started
        said = json.loads(imgclf("evaluate", str(model), str(manifest), "--json"))
        found[frame] = {"map": said["mean_average_precision"], "micro_f1": said["micro_f1"],
                        "macro_f1": said["macro_f1"], "hamming_loss": said["hamming_loss"], "count": said["count"],
                        "thresholds": [said["per_label"][lbl]["threshold"] for lbl in said["labels"]],
                        "train_seconds": seconds}  # fmt: skip
        print(f"seed {seed} frame {frame}: mAP {found[frame]['map']:.4f}  micro-F1 {found[frame]['micro_f1']:.4f}  "
              f"macro-F1 {found[frame]['macro_f1']:.4f}  hamming {found[frame]['hamming_loss']:.4f}  "
              f"on {found[frame]['count']} held-out mosaics; thresholds {found[frame]['thresholds']}; "
              f"train {seconds:.0f} s", flush=True)  # fmt: skip
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round instead of three")
    parser.add_argument("--train", type=int, default=400, help="training mosaics per round")
    parser.add_argument("--test", type=int, default=100, help="held-out mosaics per round")
    parser.add_argument("--arch", default="efficientnet_lite0", help="the backbone (imgclf train --arch)")
    parser.add_argument("--frames", default="whole,crop", help="the preprocessings to compare (--frame)")
    args = parser.parse_args()
    seeds = [1] if args.quick else [1, 2, 3]
    frames = tuple(args.frames.split(","))
    with tempfile.TemporaryDirectory(prefix="imgclf-multilabel-") as tmp:
        rounds = [one_round(seed, args.train, args.test, Path(tmp), args.arch, frames) for seed in seeds]
    for frame in frames:
        maps = [r[frame]["map"] for r in rounds]
        f1s = [r[frame]["micro_f1"] for r in rounds]
        print(f"frame {frame}: mAP {statistics.mean(maps):.4f} (min {min(maps):.4f})  micro-F1 "
              f"{statistics.mean(f1s):.4f} (min {min(f1s):.4f}) over {len(rounds)} round(s)")  # fmt: skip


if __name__ == "__main__":
    main()
