"""Training in several processes (torchrun, DDP) and photos streamed from disk.

Two measurements, each a whole ``imgclf train`` process tree watched from outside
(psutil, every 0.1 s: the peak RSS of every process in it):

``scaling``: fine-tune on brain-mri-600 (4 labels x 150 MRI slices) in one
process, then with ``--nproc-per-node 2``, each in a fresh workspace (so both
extract features): held-out accuracy, wall time, peak RSS per process.

    python benchmarks/distributed.py scaling [--data ../shared/data/brain-mri-600] [--fine-tune-epochs 2]

``memory``: one fine-tune epoch on 500, 2,000 and 8,000 photos (re-encoded copies
of the bundled flowers, generated once into /tmp) with a small ``max_memory_gb``
(photos streamed from disk) and, for contrast, a large one (all decoded into
memory). Each is ``ImageClassificationTrainer.fit_and_hold_out`` in a fresh
process (the training alone: not the CLI's evaluation, duplicate check or report).
timm's ``test_efficientnet`` with random weights keeps the network's share of the
time small: what is measured is the data path.

    python benchmarks/distributed.py memory [--sizes 500 2000 8000] [--budget-gb 0.05]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent.parent / "shared" / "data" / "brain-mri-600"


def run_watched(argv: list[str], env: dict | None = None) -> tuple[subprocess.CompletedProcess, float, dict]:
    """Run ``argv``; returns the result, wall seconds and the peak RSS (MiB) of every process
    in its tree, by role (launcher, rank N, loader worker)."""
    peaks: dict[int, tuple[str, float]] = {}
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    done = threading.Event()

    def role(p: psutil.Process) -> str:
        try:
            if p.pid == proc.pid:
                return "main"
            rank = p.environ().get("RANK")
            parent = p.parent()
            if parent is not None and parent.pid != proc.pid and rank is not None:
                return f"rank {rank} loader worker {p.pid}"
            return f"rank {rank}" if rank is not None else f"process {p.pid}"
        except (psutil.Error, OSError):
            return f"process {p.pid}"

    def watch() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                for p in [root, *root.children(recursive=True)]:
                    rss = p.memory_info().rss / 2**20
                    name = peaks.get(p.pid, (None, 0))[0] or role(p)
                    peaks[p.pid] = (name, max(rss, peaks.get(p.pid, ("", 0))[1]))
            except psutil.Error:
                pass
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stdout, stderr = proc.communicate()
    done.set()
    watcher.join()
    wall = time.perf_counter() - started
    by_role: dict[str, float] = {}
    for name, rss in peaks.values():
        by_role[name] = max(rss, by_role.get(name, 0))
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr), wall, by_role


def imgclf(*args: str) -> list[str]:
    return [sys.executable, "-m", "imgclf", *args]


def scaling(args: argparse.Namespace) -> None:
    print(f"brain-mri-600 fine-tune ({args.epochs} head epochs, {args.fine_tune_epochs} fine-tune epochs), "
          f"{os.cpu_count()} CPU cores, torch threads: all cores for 1 process, cores / N for N", flush=True)  # fmt: skip
    rows = []
    for nproc in args.nproc:
        with tempfile.TemporaryDirectory() as tmp:
            metrics = Path(tmp) / "metrics.json"
            argv = imgclf("train", str(args.data), "--fine-tune", "--fine-tune-epochs", str(args.fine_tune_epochs),
                          "--epochs", str(args.epochs), "--workspace", str(Path(tmp) / "ws"), "--device", "cpu",
                          "--out", str(Path(tmp) / "m.imgclf"), "--metrics-json", str(metrics), "-q")  # fmt: skip
            if nproc > 1:
                argv += ["--nproc-per-node", str(nproc)]
            done, wall, peaks = run_watched(argv)
            if done.returncode != 0:
                sys.exit(f"{nproc} process(es) failed:\n{done.stderr}")
            accuracy = json.loads(metrics.read_text())["micro_accuracy"]
            rows.append((nproc, accuracy, wall, peaks))
            ranks = {k: v for k, v in peaks.items() if "worker" not in k}
            print(f"  {nproc} process(es): held-out accuracy {accuracy:.4f}  wall {wall:6.1f} s  peak RSS "
                  + ", ".join(f"{k} {v:.0f} MiB" for k, v in sorted(ranks.items())), flush=True)  # fmt: skip
    if len(rows) > 1:
        print(f"  speed-up of {rows[-1][0]} processes over 1: {rows[0][2] / rows[-1][2]:.2f}x")


def make_photos(count: int, root: Path) -> Path:
    """``count`` distinct JPEGs (re-encoded, slightly cropped copies of the bundled flowers)
    under ``root/<count>/<label>/``; made once and reused."""
    from PIL import Image

    from imgclf import sample_data_dir

    folder = root / str(count)
    marker = folder / ".complete"
    if marker.exists():
        return folder
    sources = sorted(sample_data_dir("flowers").glob("*/*.jpg"))
    for i in range(count):
        src = sources[i % len(sources)]
        variant = i // len(sources)
        with Image.open(src) as img:
            img = img.convert("RGB")
            w, h = img.size
            crop = img.crop((variant % 7, variant % 5, w - variant % 3, h - variant % 11))  # a distinct photo each
            (folder / src.parent.name).mkdir(parents=True, exist_ok=True)
            crop.save(folder / src.parent.name / f"{i:05d}.jpg", quality=85 + variant % 10)
    marker.touch()
    return folder


def memory(args: argparse.Namespace) -> None:
    import timm
    import torch
    from safetensors.torch import save_file

    root = Path(args.photos)
    weights = root / "test_efficientnet.safetensors"
    if not weights.exists():
        root.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        save_file(timm.create_model("test_efficientnet", num_classes=1000).state_dict(), str(weights))
    print(f"one head and one fine-tune epoch (test_efficientnet, 160 px input, batch 16), {os.cpu_count()} CPU "
          "cores; peak RSS per process", flush=True)  # fmt: skip
    for budget in args.budgets:
        mode = "streamed from disk" if budget < 1 else "decoded in memory"
        print(f"--max-memory-gb {budget:g} ({mode}):", flush=True)
        for count in args.sizes:
            folder = make_photos(count, root)
            with tempfile.TemporaryDirectory() as tmp:
                argv = [sys.executable, __file__, "fit-once", str(folder), str(weights), str(budget), tmp]
                done, wall, peaks = run_watched(argv)
            if done.returncode != 0:
                sys.exit(f"{count} photos failed:\n{done.stderr}")
            workers = [v for k, v in peaks.items() if k != "main"]
            in_workers = f"max {max(workers):.0f} MiB ({len(workers)})" if workers else "none"
            print(f"  {count:5d} photos: main {peaks['main']:6.0f} MiB  loader workers {in_workers}  "
                  f"wall {wall:6.1f} s", flush=True)  # fmt: skip


def fit_once(args: argparse.Namespace) -> None:
    """The measured process of ``memory``: one head epoch and one fine-tune epoch."""
    from imgclf import FineTuneOptions, ImageClassificationTrainer

    trainer = ImageClassificationTrainer("test_efficientnet", weights=args.weights, epochs=1, device="cpu",
                                         use_cache=False, workspace=args.workspace, progress=False, fine_tune=True,
                                         fine_tune_options=FineTuneOptions(epochs=1), max_memory_gb=args.budget)  # fmt: skip
    trainer.fit_and_hold_out(args.folder, 0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("scaling", help="1 vs N processes on brain-mri-600")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--epochs", type=int, default=50, help="head epochs (on cached features: seconds)")
    p.add_argument("--fine-tune-epochs", type=int, default=2)
    p.set_defaults(func=scaling)
    p = sub.add_parser("memory", help="peak RSS of a fine-tune epoch as the folder grows")
    p.add_argument("--sizes", type=int, nargs="+", default=[500, 2000, 8000])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.01, 64],
                   help="--max-memory-gb values: below the set's size streams, above holds it in memory")  # fmt: skip
    p.add_argument("--photos", default=str(Path(tempfile.gettempdir()) / "imgclf-streaming-photos"))
    p.set_defaults(func=memory)
    p = sub.add_parser("fit-once", help="(the process that memory measures)")
    p.add_argument("folder")
    p.add_argument("weights")
    p.add_argument("budget", type=float)
    p.add_argument("workspace")
    p.set_defaults(func=fit_once)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
