"""Batch scoring: plain `imgclf predict`, the local `--out` engine and `--engine ray`, side by side.

Makes 5,000 images from the 200 bundled flower photos, each re-encoded as JPEG at
5 sizes (0.5x to 2x, so about 160x120 to 640x480 pixels) x 5 qualities (70 to 98)
in a temporary folder, trains the default model on the bundled flowers and exports
it to ONNX (or takes --model), then runs, each as a whole `imgclf` process and in
turn, --rounds times:

  plain   imgclf predict MODEL FOLDER            (TSV to /dev/null)
  local   imgclf predict MODEL FOLDER --out results.parquet -q
  ray     imgclf predict MODEL FOLDER --out results.parquet --engine ray -q   (starts Ray on this machine)

and prints images/s (whole process, and the scoring phase the `--out` runs report),
Ray's overhead against the local engine, the local engine's cost against plain
prediction, and the peak memory of each run's whole process tree (Ray's raylet,
GCS and workers included): summed RSS, and summed PSS, which counts pages shared
between processes (Ray's object store) once. Linux only (reads /proc).
The three outputs are checked to give the same labels.

    python benchmarks/batch_scoring.py [--images 5000] [--rounds 2] [--model m.onnx]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SCALES = (0.5, 0.75, 1.0, 1.5, 2.0)
QUALITIES = (70, 80, 90, 95, 98)


def make_images(dest: Path, count: int) -> Path:
    """``count`` JPEGs re-encoded from the bundled flowers (one subfolder per label)."""
    from PIL import Image

    from imgclf import sample_data_dir

    photos = sorted(sample_data_dir("flowers").glob("*/*.jpg"))
    made = 0
    for scale in SCALES:
        for quality in QUALITIES:
            for photo in photos:
                if made == count:
                    return dest
                with Image.open(photo) as im:
                    im = im.convert("RGB")
                    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
                    folder = dest / photo.parent.name
                    folder.mkdir(parents=True, exist_ok=True)
                    im.resize(size, Image.Resampling.BICUBIC).save(
                        folder / f"{photo.stem}_x{scale}_q{quality}.jpg", quality=quality
                    )
                made += 1
    if made < count:
        raise SystemExit(f"--images at most {made}")
    return dest


def train_model(dest: Path) -> Path:
    from imgclf import ImageClassificationTrainer, load_images_from_directory, sample_data_dir

    images = load_images_from_directory(sample_data_dir("flowers"))
    model = ImageClassificationTrainer(workspace=dest / "ws", progress=False).fit(images)
    return model.export_onnx(dest / "flowers.onnx")


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in kB; zeros once it is gone."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    fields = dict(re.findall(r"^(Rss|Pss):\s+(\d+) kB", rollup, re.M))
    return int(fields.get("Rss", 0)), int(fields.get("Pss", 0))


class PeakMemory(threading.Thread):
    """Samples the summed RSS and PSS of a process and all its descendants."""

    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.rss_mb = self.pss_mb = 0.0
        self.processes = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            pids = _tree(self.pid)
            sums = [sum(x) for x in zip(*(_memory_kb(p) for p in pids))] or [0, 0]
            self.rss_mb = max(self.rss_mb, sums[0] / 1024)
            self.pss_mb = max(self.pss_mb, sums[1] / 1024)
            self.processes = max(self.processes, len(pids))
            self.done.wait(self.every)


def run(argv: list[str]) -> dict:
    """One whole `imgclf` process: wall seconds, its scoring-phase seconds (if it says), peak memory."""
    started = time.perf_counter()
    with open(os.devnull, "w") as devnull, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "imgclf.cli", *argv], stdout=subprocess.PIPE, stderr=err,
                                text=True)  # fmt: skip
        memory = PeakMemory(proc.pid)
        memory.start()
        stdout_lines = []
        for line in proc.stdout:
            if line.startswith("Scored "):
                stdout_lines.append(line)
            else:
                devnull.write(line)
        proc.wait()
        memory.done.set()
        memory.join()
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{err.read()[-3000:]}")
    wall = time.perf_counter() - started
    phase = re.search(r" in ([\d.]+) s \(", "".join(stdout_lines))
    return {"wall": wall, "phase": float(phase.group(1)) if phase else None, "rss": memory.rss_mb,
            "pss": memory.pss_mb, "processes": memory.processes}  # fmt: skip


def labels_of(out: Path) -> dict[str, str | None]:
    import pyarrow.parquet as pq

    return {r["path"]: r["label"] for r in pq.read_table(out, columns=["path", "label"]).to_pylist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", help="an exported .onnx model (default: train one on the bundled flowers)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="imgclf-batch-bench-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        folder = make_images(tmp / "images", args.images)
        model = Path(args.model) if args.model else train_model(tmp)
        print(f"{args.images} images in {folder} ({time.perf_counter() - started:.0f} s to make them and the model); "
              f"model {model.name}; {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}", flush=True)  # fmt: skip
        runs: dict[str, list[dict]] = {"plain": [], "local": [], "ray": []}
        for round_ in range(args.rounds):
            for name in runs:
                out = tmp / f"{name}-{round_}.parquet"
                argv = ["predict", str(model), str(folder)]
                if name != "plain":
                    argv += ["--out", str(out), "-q"] + (["--engine", "ray"] if name == "ray" else [])
                result = run(argv)
                result["out"] = out
                runs[name].append(result)
                phase = f", scoring phase {result['phase']:.1f} s" if result["phase"] else ""
                print(f"round {round_ + 1} {name:<5} {result['wall']:6.1f} s whole process{phase}, "
                      f"peak RSS {result['rss']:.0f} MB / PSS {result['pss']:.0f} MB "
                      f"({result['processes']} processes)", flush=True)  # fmt: skip
        local_labels = labels_of(runs["local"][0]["out"])
        ray_labels = labels_of(runs["ray"][0]["out"])
        assert len(local_labels) == args.images and local_labels == ray_labels, "local and Ray disagree"

        def median(name: str, key: str) -> float | None:
            values = [r[key] for r in runs[name] if r[key] is not None]
            return statistics.median(values) if values else None

        n = args.images
        print(f"\nmedian of {args.rounds} round(s), {n} images:\n")
        print("| run | whole process s | img/s (whole) | scoring phase img/s | peak RSS MB | peak PSS MB |")
        print("|---|---|---|---|---|---|")
        for name, label in (("plain", "`imgclf predict` (TSV)"), ("local", "`--out results.parquet`"),
                            ("ray", "`--out results.parquet --engine ray`")):  # fmt: skip
            wall, phase = median(name, "wall"), median(name, "phase")
            phase_rate = f"{n / phase:.1f}" if phase else "-"
            print(f"| {label} | {wall:.1f} | {n / wall:.1f} | {phase_rate} | {median(name, 'rss'):.0f} | "
                  f"{median(name, 'pss'):.0f} |")  # fmt: skip
        parquet_cost = median("local", "wall") / median("plain", "wall") - 1
        ray_whole = median("ray", "wall") / median("local", "wall")
        ray_phase = median("ray", "phase") / median("local", "phase")
        print(f"\nParquet path over plain prediction: {parquet_cost:+.1%} wall (goal: under +5%)")
        print(f"Ray's overhead on one machine: {ray_phase:.2f}x the local engine's scoring time, "
              f"{ray_whole:.2f}x its whole-process time with Ray's start-up (goal: within 1.5x)")  # fmt: skip
        print("Labels: local and Ray agree on every image.")


if __name__ == "__main__":
    main()
