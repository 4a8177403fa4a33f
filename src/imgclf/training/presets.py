"""Presets and a time budget: the most accurate model the user's time allows.

``quality`` (``--quality``) says how much training to do, ``time_limit`` (``--time-limit``)
how long it may take:

- ``fast``: the head alone, on the frozen backbone's cached features (seconds): today's
  head-only model, exactly.
- ``best``: the whole backbone fine-tuned at the test resolution on every training photo, for
  a fixed schedule whose last epoch is kept (no validation carve-out: the photos it would hold
  out train instead).
- ``balanced`` (the default) decides from the folder, at no cost: photos like ImageNet keep the
  head alone (fine-tuning gained half a point on the bundled flowers), photos unlike it (scans,
  slides) are fine-tuned as ``best`` does, inside the time limit (10 minutes unless given):
  the epochs that fit are planned, so a slow machine gets a shorter schedule, not a cut one.
  (The speed-first recipe of ``--fine-tune``, smaller crops and the first blocks frozen, takes
  half the time but gained less on the brain MRI folds: docs/benchmarks.md#presets.) How far the
  photos are from ImageNet is read from the pooled features the head is trained on
  (:mod:`imgclf.nets.distance`), so the decision needs no pass through the network.

A time limit is kept by planning: the first batches of fine-tuning are timed, the number of
epochs that fit in what is left is planned (the learning-rate schedule is laid over them), and
after every epoch the plan is checked against the clock; training stops only between epochs,
keeping the best model so far, and says what a larger limit would have bought.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from imgclf.nets.distance import FEATURE_DISTANCE_THRESHOLD
from imgclf.options import BALANCED_TIME_LIMIT_S, option_error
from imgclf.training.budget import say_duration
from imgclf.training.finetune import FineTuneOptions

#: Per label, the fewest training photos with which ``balanced`` fine-tunes: the smallest folders
#: measured had 32 (flowers) and 120 (brain-mri-600) a label; below 10 nothing was measured.
MIN_PHOTOS_TO_FINE_TUNE = 10
#: ``best`` over head-only on brain-mri-600, 5-fold mean (docs/benchmarks.md#presets): said in balanced's line.
BRAIN_GAIN_POINTS = 6.0


def best_options(given: FineTuneOptions | None, input_size: int) -> FineTuneOptions:
    """``best``'s recipe: training crops at the test size, no frozen blocks, no carve-out (every
    photo trains; the schedule's last epoch is kept). Fields the caller changed from their
    defaults are kept as given."""
    options = replace(given) if given is not None else FineTuneOptions()
    default = FineTuneOptions()
    if options.train_size == default.train_size:
        options.train_size = input_size
    if options.frozen_blocks == default.frozen_blocks:
        options.frozen_blocks = 0
    if options.validation_fraction == default.validation_fraction:
        options.validation_fraction = 0.0
    return options


@dataclass
class QualityPlan:
    """What a ``quality`` decided, before training: fine-tune or not, with which options, within
    which time limit; ``lines`` say why (printed, and recorded in ``model.info["quality"]``)."""

    asked: str
    fine_tune: bool
    options: FineTuneOptions | None
    recipe: str  # "head only", "speed-first fine-tune" or "best fine-tune"
    time_limit: float | None
    distance: float | None = None
    lines: list[str] = field(default_factory=list)

    def record(self) -> dict:
        return {"asked": self.asked, "recipe": self.recipe, "time_limit_s": self.time_limit,
                "feature_distance": self.distance, "lines": list(self.lines)}  # fmt: skip


def check_quality(quality: str, fine_tune: bool, from_model: object = None) -> None:
    """Refuse a ``fine_tune`` that contradicts ``quality``, and ``best`` with ``from_model`` (one
    line, before any work)."""
    if quality == "fast" and fine_tune:
        raise option_error(
            "quality", "{quality} fast trains the head alone; drop {fine_tune} or choose balanced or best"
        )
    if quality == "best" and from_model is not None:
        raise option_error("quality", "{from_model} with {quality} best: fine-tuning trains the backbone on the photos "
                                      "themselves, which a model file does not keep; choose balanced or fast")  # fmt: skip


def plan_quality(
    quality: str,
    fine_tune: bool,
    options: FineTuneOptions | None,
    *,
    input_size: int,
    distance: float | None,
    fewest_per_label: int,
    time_limit: float | None,
    why_head_only: str | None = None,
) -> QualityPlan:
    """Decide what ``quality`` trains. ``fine_tune`` (``--fine-tune``) fine-tunes whatever
    ``balanced`` would decide (``best`` fine-tunes anyway; ``fast`` refuses it). ``distance``: the photos'
    feature distance from ImageNet (None: not known for this network); ``fewest_per_label``: the
    training photos of the rarest label; ``why_head_only``: a reason these photos train the head
    alone whatever is asked (multi-label, ``--from``), said in the line. The arguments are
    checked already (the option schema, :func:`check_quality`)."""
    head = f"quality {quality}: head only"
    if why_head_only is not None:
        return QualityPlan(quality, False, None, "head only", None, distance, [f"{head}: {why_head_only}"])
    if quality == "fast":
        return QualityPlan(quality, False, None, "head only", None, distance,
                           [f"{head} (on the frozen backbone's features: seconds)"])  # fmt: skip
    within = "" if time_limit is None else f", within {say_duration(time_limit)} (--time-limit)"
    if quality == "best":
        o = best_options(options, input_size)
        which = "the whole backbone" if o.frozen_blocks == 0 else f"all but the first {o.frozen_blocks} blocks"
        photos = (f"every training photo for {o.epochs} epochs, keeping the last" if o.validation_fraction == 0 else
                  f"{100 * (1 - o.validation_fraction):.0f}% of the photos, choosing the epoch on the others")  # fmt: skip
        line = f"quality best: fine-tune {which} at {o.train_size} px on {photos}{within}"
        return QualityPlan(quality, True, o, "best fine-tune", time_limit, distance, [line])
    o = options or FineTuneOptions()
    if fine_tune:  # balanced with the caller's --fine-tune: today's recipe, limited only when asked
        return QualityPlan(quality, True, o, "speed-first fine-tune", time_limit, distance,
                           [f"quality balanced with --fine-tune: the speed-first fine-tune{within}"])  # fmt: skip
    limit = BALANCED_TIME_LIMIT_S if time_limit is None else time_limit
    if distance is None:
        return QualityPlan(quality, False, None, "head only", limit, None, [
            f"{head}: how far the photos are from ImageNet cannot be read from this network's features; "
            "--quality best fine-tunes"])  # fmt: skip
    if distance < FEATURE_DISTANCE_THRESHOLD:
        return QualityPlan(quality, False, None, "head only", limit, distance, [
            f"{head}: the photos look like ImageNet (feature distance {distance:.3f} < {FEATURE_DISTANCE_THRESHOLD}), "
            "where fine-tuning gained half a point on the flowers; --quality best fine-tunes anyway"])  # fmt: skip
    unlike = f"the photos look unlike ImageNet (feature distance {distance:.3f} >= {FEATURE_DISTANCE_THRESHOLD})"
    if fewest_per_label < MIN_PHOTOS_TO_FINE_TUNE:
        return QualityPlan(quality, False, None, "head only", limit, distance, [
            f"{head}: {unlike}, but a label has only {fewest_per_label} training photos; balanced fine-tunes from "
            f"{MIN_PHOTOS_TO_FINE_TUNE} a label (fewer were not measured); --quality best fine-tunes anyway"])  # fmt: skip
    o = best_options(options, input_size)
    return QualityPlan(quality, True, o, "best fine-tune", limit, distance, [
        f"quality balanced: fine-tune as --quality best does, within {say_duration(limit)}: {unlike}, where it "
        f"gained {BRAIN_GAIN_POINTS:.0f} points on brain MRI slices"])  # fmt: skip
