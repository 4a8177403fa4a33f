"""The main job, timed as a user runs it: default ``imgclf train`` on the bundled 200 flowers,
whole process, fresh (an empty workspace) and warm (the features already cached).

    python benchmarks/main_job.py [--runs 5] [--baseline-src PATH]

Each run is a new process; the figure quoted is the median wall time. With
``--baseline-src`` (the ``src`` folder of another checkout, e.g. a worktree of the
previous release) the same runs alternate with that code's, so the ratio holds when
the machine's speed drifts. Prints the held-out accuracy of each, which must not move.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def run(workspace: str, src: str | None, extra: list[str], fresh: bool) -> tuple[float, str]:
    if fresh:
        shutil.rmtree(workspace, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=src) if src else dict(os.environ)
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "imgclf", "train", "--workspace", workspace, "-q",
                               "--out", f"{out}/m.imgclf", *extra], capture_output=True, text=True, env=env)  # fmt: skip
        seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"imgclf train failed: {done.stderr.strip().splitlines()[-1:]}")
    accuracy = re.search(r"micro accuracy\s+([0-9.]+)", done.stdout)
    return seconds, accuracy[1] if accuracy else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--baseline-src", help="src folder of the code to compare with")
    parser.add_argument("--baseline-args", default="--precision fp32",
                        help="options for the baseline (default: %(default)s, its fastest)")  # fmt: skip
    args = parser.parse_args()
    contenders = [("today", None, [])]
    if args.baseline_src:
        contenders.append(("baseline", args.baseline_src, args.baseline_args.split()))
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("fresh", "warm"):
            times: dict[str, list[float]] = {name: [] for name, _, _ in contenders}
            accuracy = {}
            for name, src, extra in contenders:  # warm-up: fills each workspace once
                run(f"{tmp}/{name}", src, extra, fresh=True)
            for _ in range(args.runs):
                for name, src, extra in contenders:
                    seconds, accuracy[name] = run(f"{tmp}/{name}", src, extra, fresh=kind == "fresh")
                    times[name].append(seconds)
            for name in times:
                median = statistics.median(times[name])
                print(f"{kind:<5} {name:<8} median {median:5.2f} s  (min {min(times[name]):.2f}, "
                      f"max {max(times[name]):.2f}, {args.runs} runs)  held-out accuracy {accuracy[name]}")  # fmt: skip
            if len(times) == 2:
                ratios = [a / b for a, b in zip(times["today"], times["baseline"])]
                print(f"{kind:<5} today / baseline: median {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
