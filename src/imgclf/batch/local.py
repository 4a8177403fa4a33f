"""Scoring on this machine into a results folder: streamed, resumable, with progress.

Paths stream from the inputs (never all listed first when they come from a
manifest), skip those already in the output, are decoded in threads while the
network scores the previous batch (as ``imgclf predict`` does), and leave as
result rows in parts committed every few seconds. Memory stays flat in the number
of inputs, apart from 16 bytes for each row already in the output when resuming.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from imgclf.batch.scoring import ModelFile, load_input, load_scoring_model, score_loaded
from imgclf.batch.sources import Input, classify_inputs, iter_image_paths
from imgclf.batch.writers import PathSet, check_output, open_results
from imgclf.data.parallel import batched, ordered_map
from imgclf.errors import MissingDependencyError
from imgclf.options import COMMIT_EVERY, INFERENCE_DEVICE, SCORING_BATCH_SIZE, TOP_K, install_hint, validate


@dataclass
class ScoringSummary:
    """What a run did: rows written (scored and failed), inputs skipped as already done."""

    out: Path | str  # a folder, or an object store's URI
    scored: int
    failed: int
    skipped: int
    seconds: float
    engine: str = "local"

    @property
    def images_per_second(self) -> float:
        return (self.scored + self.failed) / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        done = f"Scored {self.scored} image(s)"
        if self.failed:
            done += f", {self.failed} unreadable (error rows)"
        if self.skipped:
            done += f", skipped {self.skipped} already in the output"
        return f"{done} in {self.seconds:.1f} s ({self.images_per_second:.1f} img/s, {self.engine}) -> {self.out}"


class ScoringInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a run; what was scored is committed."""

    def __init__(self, summary: ScoringSummary):
        super().__init__(f"interrupted; {summary.scored + summary.failed} new row(s) kept in {summary.out}; "
                         "run the same command again to score the rest")  # fmt: skip
        self.summary = summary


def check_options(**values) -> None:
    """Batch scoring's options (``top_k``, ``batch_size``...), checked as ``imgclf predict``'s."""
    validate("predict", values)


def score_to_folder(
    model: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    top_k: int = TOP_K,
    batch_size: int = SCORING_BATCH_SIZE,
    device: str = INFERENCE_DEVICE,
    threads: int | None = None,
    engine: str = "auto",
    precision: str = "auto",
    decode_workers: int | None = None,
    progress: bool = True,
    commit_every: float = COMMIT_EVERY,
    rows_per_part: int = 100_000,
) -> ScoringSummary:
    """Score every image ``inputs`` name into the results folder ``out``.

    Everything that can be checked is checked before the first image is read
    (output name, inputs, model file): each problem is one :class:`ImgclfError`.
    Re-running the same call after a crash or Ctrl-C scores only what is missing.
    """
    check_options(top_k=top_k, batch_size=batch_size, commit_every=commit_every, device=device, engine=engine,
                  precision=precision)  # fmt: skip
    check_output(out)
    sources = classify_inputs(inputs)
    model_file = ModelFile.read(model)
    predictor = load_scoring_model(model, device, threads, engine, precision)
    choice = predictor.engine_choice()
    if progress:
        print(f"imgclf: {choice.describe()}", file=sys.stderr, flush=True)
    metadata = model_file.metadata(predictor.labels, top_k, choice.to_dict())
    started = time.perf_counter()
    scored = failed = 0
    skipped = [0]
    with open_results(out, metadata, commit_every=commit_every, rows_per_part=rows_per_part) as folder:
        done = folder.done

        def pending() -> Iterator[str]:
            for path in iter_image_paths(sources):
                if path in done:
                    skipped[0] += 1
                else:
                    yield path

        prep = predictor.preprocessing
        loaded = ordered_map(lambda p: (p, load_input(p, p, prep)), pending(), decode_workers, prefetch=2 * batch_size)
        bar = _progress_bar(progress, sources, done)
        try:
            for chunk in batched(loaded, batch_size):
                batch = score_loaded(predictor, [p for p, _ in chunk], [o for _, o in chunk], top_k)
                folder.write(batch)
                failed += batch.failed
                scored += len(batch) - batch.failed
                bar.update(len(batch))
        except KeyboardInterrupt:
            bar.close()
            summary = ScoringSummary(out, scored, failed, skipped[0], time.perf_counter() - started)
            raise ScoringInterrupted(summary) from None
        bar.close()
        folder.finish()  # every input scored: _SUCCESS and the row counts
    return ScoringSummary(out, scored, failed, skipped[0], time.perf_counter() - started)


class _Bar:
    """tqdm's bar (images/s, and an ETA once a background count of the inputs
    finishes), or nothing when output is not a terminal or progress is off."""

    def __init__(self, bar, counter: _Counter | None):
        self.bar = bar
        self.counter = counter

    def update(self, n: int) -> None:
        if self.bar is None:
            return
        if self.counter is not None and self.counter.total is not None:
            self.bar.total = self.counter.total
            self.counter = None
        self.bar.update(n)

    def close(self) -> None:
        if self.counter is not None:
            self.counter.stop = True
        if self.bar is not None:
            self.bar.close()


class _Counter(threading.Thread):
    def __init__(self, sources: Sequence[Input], done: PathSet):
        super().__init__(daemon=True, name="imgclf-count")
        self.sources, self.done = sources, done
        self.total: int | None = None
        self.stop = False

    def run(self) -> None:
        n = 0
        for path in iter_image_paths(self.sources):
            if self.stop:
                return
            n += path not in self.done
        self.total = n


def _progress_bar(progress: bool, sources: Sequence[Input], done: PathSet) -> _Bar:
    if not progress:
        return _Bar(None, None)
    try:
        from tqdm import tqdm
    except ImportError:
        raise MissingDependencyError(f"the progress bar needs tqdm: {install_hint('batch')} (or pass -q)") from None
    bar = tqdm(unit="img", desc="scoring", disable=None, smoothing=0.05, dynamic_ncols=True)
    if bar.disable:
        return _Bar(None, None)
    counter = _Counter(sources, done)
    counter.start()
    return _Bar(bar, counter)
