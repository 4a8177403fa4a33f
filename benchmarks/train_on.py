"""Training on from a model (``train --from``) against training from scratch: accuracy and wall time.

On the bundled flowers (5 labels x 40 photos), each round holds the same 8 photos of every label
out (a seeded draw), then runs the whole command ``imgclf train``, each in a fresh workspace
(features computed, as on a first run):

1. a 4-label model on 4 labels' other 32 photos (``train/`` + ``test/`` folders: its test photos
   held out as given);
2. that model trained on with the fifth label's 32 photos alone (``--from``), its 8 test photos
   held out: it is measured on them and on the 4-label model's 32 held-out features;
3. a 5-label model from scratch on all 5 x 32 photos, held out: the same 40 photos.

Prints the held-out accuracy of each and the command's wall time. The two 5-label models are also
scored again from the 40 photos (``evaluate``), so both figures are on the same photos for certain.

    python benchmarks/train_on.py            # 3 rounds (split seeds 1, 2, 3)
    python benchmarks/train_on.py --quick    # one round
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from imgclf import load_images_from_directory, load_model, sample_data_dir

REPO = Path(__file__).resolve().parent.parent
LABELS = ("daisy", "dandelion", "roses", "sunflowers", "tulips")
NEW = "tulips"
HELD_OUT = 8


def split(dest: Path, labels, seed: int) -> Path:
    """``dest/train/<label>`` and ``dest/test/<label>``, links to the flowers: the same seeded
    ``HELD_OUT`` photos of each label in ``test/`` whichever labels a folder has."""
    flowers = sample_data_dir("flowers")
    for label in labels:
        photos = sorted((flowers / label).glob("*.jpg"))
        random.Random(f"{seed}-{label}").shuffle(photos)
        for part, chosen in (("test", photos[:HELD_OUT]), ("train", photos[HELD_OUT:])):
            (dest / part / label).mkdir(parents=True)
            for photo in chosen:
                (dest / part / label / photo.name).symlink_to(photo)
    return dest


def train(source: Path, out: Path, *extra: str) -> tuple[float, float]:
    """``imgclf train SOURCE`` in a fresh process and workspace: (held-out accuracy, wall seconds)."""
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "imgclf", "train", str(source), "--out", str(out / "m.imgclf"), "--workspace",
           str(out / "workspace"), "--metrics-json", str(out / "metrics.json"), "-q", *extra]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    said = json.loads((out / "metrics.json").read_text())
    return said["micro_accuracy"], seconds


def one_round(work: Path, seed: int) -> dict:
    four = split(work / "four", LABELS[:-1], seed)
    fifth = split(work / "fifth", (NEW,), seed)
    five = split(work / "five", LABELS, seed)
    rows = {"4 labels (base)": train(four, work / "base")}
    rows[f"--from the base + {NEW} photos alone"] = train(fifth, work / "from", "--from", str(work / "base/m.imgclf"))
    rows["5 labels from scratch"] = train(five, work / "scratch")
    test = load_images_from_directory(five / "test")
    rescored = {name: load_model(work / name / "m.imgclf").evaluate(test).micro_accuracy for name in ("from", "scratch")}
    return {"rows": rows, "rescored": rescored}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round")
    args = parser.parse_args()
    seeds = [1] if args.quick else [1, 2, 3]
    results = []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as tmp:
            result = one_round(Path(tmp), seed)
        results.append(result)
        print(f"split seed {seed}:")
        for name, (accuracy, seconds) in result["rows"].items():
            print(f"  {name:<40} held-out accuracy {accuracy:.4f}  {seconds:5.1f} s")
        print(f"  rescored on the same 40 photos: --from {result['rescored']['from']:.4f}, "
              f"scratch {result['rescored']['scratch']:.4f}")  # fmt: skip
    gaps = [r["rescored"]["scratch"] - r["rescored"]["from"] for r in results]
    print(f"\nscratch minus --from, in accuracy points: {', '.join(f'{100 * g:+.1f}' for g in gaps)} "
          f"(mean {100 * statistics.mean(gaps):+.1f})")  # fmt: skip


if __name__ == "__main__":
    main()
