"""Training from a manifest against training from the folder it lists: accuracy and wall time side by side.

For each set (the bundled flowers, and ``../shared/data/brain-mri-600`` when it is there), writes a
CSV manifest of the folder's images (rows shuffled, paths relative to the manifest) and runs the
whole command ``imgclf train`` on the folder and on the manifest, alternately, each run with a fresh
workspace (features computed, as a first run is). Prints the held-out accuracy and the command's
wall time of each, and the largest difference between the two models' head weights (the same seed
must give the same split and the same model: 0 up to float noise).

    python benchmarks/manifests.py            # both sets, 3 rounds
    python benchmarks/manifests.py --quick    # the flowers, one round
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

from imgclf import load_images_from_directory, load_model, sample_data_dir

REPO = Path(__file__).resolve().parent.parent


def brain_path() -> Path | None:
    """../shared/data/brain-mri-600 from the repository root or a folder above it (a worktree)."""
    for folder in REPO.parents:
        candidate = folder / "shared" / "data" / "brain-mri-600"
        if candidate.is_dir():
            return candidate
    return None


def write_manifest(folder: Path, dest: Path) -> Path:
    """A CSV of the folder's images (path relative to the manifest, label), in shuffled order."""
    rows = [[os.path.relpath(im.source, dest.parent), im.label] for im in load_images_from_directory(folder)]
    random.Random(0).shuffle(rows)
    with open(dest, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["path", "label"], *rows])
    return dest


def train(source: Path, out: Path) -> tuple[float, float]:
    """``imgclf train SOURCE`` in a fresh process and workspace: (held-out accuracy, wall seconds)."""
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "imgclf", "train", str(source), "--out", str(out / "m.imgclf"), "--workspace",
           str(out / "workspace"), "--metrics-json", str(out / "metrics.json"), "-q"]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return json.loads((out / "metrics.json").read_text())["micro_accuracy"], seconds


def head_difference(a: Path, b: Path) -> float:
    first, second = load_model(a).head.state_dict(), load_model(b).head.state_dict()
    return max((first[k] - second[k]).abs().max().item() for k in first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the flowers only, one round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sets = [("bundled flowers", sample_data_dir("flowers"))]
    if not args.quick and brain_path() is not None:
        sets.append(("brain-mri-600", brain_path()))
    rounds = 1 if args.quick else args.rounds
    print(f"{'set':<16} {'input':<9} {'images':>6} {'accuracy':>9} {'wall s':>22}  head weights apart")
    for name, folder in sets:
        with tempfile.TemporaryDirectory(prefix="imgclf-manifests-") as tmp:
            manifest = write_manifest(folder, Path(tmp) / "data.csv")
            results: dict[str, list[tuple[float, float]]] = {"folder": [], "manifest": []}
            for r in range(rounds):
                for kind, source in (("folder", folder), ("manifest", manifest))[:: 1 if r % 2 == 0 else -1]:
                    results[kind].append(train(source, Path(tmp) / f"{kind}-{r}"))
            apart = head_difference(Path(tmp) / "folder-0" / "m.imgclf", Path(tmp) / "manifest-0" / "m.imgclf")
            count = len(load_images_from_directory(folder))
            for kind, runs in results.items():
                seconds = [s for _, s in runs]
                said = f"{statistics.median(seconds):.1f}" + (f" ({min(seconds):.1f} to {max(seconds):.1f})"
                                                               if len(seconds) > 1 else "")  # fmt: skip
                print(f"{name:<16} {kind:<9} {count:>6} {runs[0][0]:>9.4f} {said:>22}  "
                      + (f"{apart:.1e}" if kind == "manifest" else ""))  # fmt: skip


if __name__ == "__main__":
    main()
