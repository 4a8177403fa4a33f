"""A training run's time limit: the clock, what a fine-tune epoch costs, and how many fit.

The first steps of fine-tuning are timed; from them :class:`EpochCosts` estimates an epoch
(its steps and the scoring of the validation photos) and what must still run after the last one;
:func:`epochs_that_fit` plans the epochs that fit in the time left, and :func:`plan_line` says
so, with what a larger limit would buy. The fine-tuner (:mod:`imgclf.training.finetune`) keeps
to the plan and checks the clock after every epoch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass


def say_duration(seconds: float) -> str:
    """``"45 s"``, ``"4.7 min"`` or ``"1.3 h"``: how the lines state times."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def limit_flag(seconds: float) -> str:
    """The ``--time-limit`` that allows ``seconds``, in whole minutes, rounded up."""
    return f"--time-limit {max(1, math.ceil(seconds / 60))}m"


class TimeBudget:
    """The clock of one run with a time limit (``seconds``), started when training starts."""

    def __init__(self, seconds: float, started: float | None = None):
        self.seconds = seconds
        self.started = time.monotonic() if started is None else started

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def remaining(self) -> float:
        return self.seconds - self.elapsed()


@dataclass
class EpochCosts:
    """Seconds a fine-tune epoch costs, estimated from its first timed steps: the steps
    themselves, the scoring of the validation photos and what must still run after the last
    epoch (the detector's and the evaluation's passes, saving): ``reserve``."""

    step: float
    steps: int
    scoring: float
    reserve: float

    @property
    def epoch(self) -> float:
        return self.step * self.steps + self.scoring

    @classmethod
    def from_steps(cls, seconds: float, done: int, steps: int, batch: int, *, scored_images: int,
                   passes_after: int, pixel_ratio: float = 1.0) -> EpochCosts:  # fmt: skip
        """From ``done`` steps (of ``batch`` images) that took ``seconds``. Scoring an image is a
        forward pass, about a third of its training step (the backward pass costs twice the
        forward), times ``pixel_ratio``: the test input's pixels over the training crop's."""
        step = seconds / max(1, done)
        per_image = pixel_ratio / 3 * step / max(1, batch)
        return cls(step, steps, per_image * scored_images, per_image * passes_after + 3.0)


def epochs_that_fit(remaining: float, costs: EpochCosts, done_steps: int, wanted: int) -> int:
    """How many epochs (this one included) fit in ``remaining`` seconds, ``done_steps`` into the
    first; 0 when not even this one does. At most ``wanted``."""
    left = remaining - costs.reserve - (costs.step * (costs.steps - done_steps) + costs.scoring)
    if left < 0:
        return 0
    return min(wanted, 1 + int(left // max(costs.epoch, 1e-9)))


def plan_line(planned: int, wanted: int, costs: EpochCosts, limit: float, elapsed: float) -> str:
    """The time limit's line once the first steps are timed (``elapsed`` seconds into the run);
    what the full recipe would need."""
    each = f"about {say_duration(costs.epoch)} each"
    if planned >= wanted:
        return f"time limit {say_duration(limit)}: all {wanted} fine-tune epochs fit ({each})"
    full = costs.epoch * wanted + costs.reserve
    if planned == 0:
        return (f"time limit {say_duration(limit)}: not one fine-tune epoch fits ({each}); kept the head-only model; "
                f"the full recipe ({wanted} epochs) needs about {say_duration(full)} more ({limit_flag(elapsed + full)})")  # fmt: skip
    return (f"time limit {say_duration(limit)}: {planned} of {wanted} fine-tune epochs fit ({each}); "
            f"all {wanted} need about {say_duration(costs.epoch * (wanted - planned))} more ({limit_flag(limit + costs.epoch * (wanted - planned))})")  # fmt: skip
