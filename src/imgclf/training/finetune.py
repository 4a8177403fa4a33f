"""Fine-tuning: after the head converges, train the backbone too, with a recipe fitted to the photos.

Frozen ImageNet features are already near the best this backbone gets on photos
like ImageNet's (flowers, pets), and far from it on photos unlike them (MRI
slices, X-rays, micrographs). So the default recipe is decided from the photos:

- how far they are from ImageNet: each batch-norm layer's statistics of a sample
  of the photos against the running statistics it learned on ImageNet
  (:func:`imagenet_distance`). Near: batch-norm statistics stay frozen and the
  backbone learns at a fifth of the head's rate. Far: the statistics adapt to the
  photos and the backbone learns at the head's rate, with milder crops;
- whether they are grayscale (scans): then no colour operations in the augmentation;
- when to stop: a stratified share of the training photos is held out; every epoch
  is scored on it, training stops ``patience`` epochs after the best one and that
  epoch's weights are kept; if no epoch beats the head-only model, the head-only
  model is kept (so fine-tuning never costs accuracy it can measure).

Each choice is logged as one line (logger ``imgclf``; the CLI prints them) and
recorded in ``model.info["fine_tune"]``. Any field of :class:`FineTuneOptions`
set by the caller overrides its decision.

Speed on the CPU: training crops are smaller than the test input (FixRes: random
crops enlarge objects, so a smaller training size matches the test view and
costs about (train/test)^2 of the arithmetic); the stem and the first blocks are
never trained, so nothing back-propagates through the costly high-resolution
layers; photos are decoded once and kept in memory. On a GPU the augmentation
runs in worker processes and the arithmetic in mixed precision.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from imgclf.data.images import ImageData
from imgclf.data.imaging import Preprocessing
from imgclf.data.parallel import ordered_map
from imgclf.data.streaming import decode_picture
from imgclf.errors import OptionError
from imgclf.nets.device import mixed_precision_dtype
from imgclf.options import COMMANDS, check
from imgclf.training import distributed
from imgclf.training.budget import EpochCosts, epochs_that_fit, plan_line, say_duration
from imgclf.training.history import BestEpoch, EarlyStopping, EpochMetrics

log = logging.getLogger("imgclf")

# imagenet_distance of 64 photos (EfficientNet-Lite0): ImageNet photos 0.04, the bundled
# flowers 0.07, brain MRI slices 0.18; with 8 photos 0.05, 0.10, 0.17. The threshold
# sits between flowers and MRI (their geometric mean, rounded up for small samples).
IMAGENET_DISTANCE_THRESHOLD = 0.12
BATCH_NORM_MODES = ("auto", "frozen", "adapt")

GEOMETRIC_OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
ORIENTATION_OPS = ("ShearX", "ShearY", "Rotate")
INTENSITY_OPS = ("Brightness", "Contrast", "Sharpness", "AutoContrast")
COLOUR_OPS = ("Color", "Posterize", "Solarize", "Equalize")


@dataclass
class FineTuneOptions:
    """How to fine-tune. Fields left at ``None`` (and ``batch_norm="auto"``) are
    decided from the photos when training starts (:func:`choose_recipe`)."""

    epochs: int = 10  # at most: with a validation share, training stops when it stops paying
    batch_size: int = 16
    learning_rate: float = 1e-3  # the head's; the backbone's is backbone_lr_ratio times this
    backbone_lr_ratio: float | None = None  # None: 0.2 near ImageNet, 1.0 far from it
    layer_decay: float | None = None  # None: 0.85 near ImageNet, 0.95 far from it
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    warmup_epochs: int = 1
    unfreeze: int | None = None  # train only the last N blocks; None: all but the first `frozen_blocks`
    frozen_blocks: int = 2  # the stem and this many first blocks never train
    batch_norm: str = "auto"  # "frozen", "adapt" (statistics follow the photos) or "auto"
    color_augment: bool | None = None  # None: on for colour photos, off for grayscale ones
    keep_orientation: bool = False  # no flips, rotations or shears (text, X-rays with a side, maps)
    randaugment_magnitude: int | None = None  # None: 7 near ImageNet, 5 far from it
    min_crop: float | None = None  # smallest random crop, share of the area; None: 0.3 near, 0.5 far
    train_size: int | None = None  # training crop side; None: about 0.8 of the test input (FixRes)
    validation_fraction: float = 0.15  # held out of the training photos to pick the epoch; 0: none
    patience: int = 4  # fine-tune epochs without a better validation score before stopping
    loader_workers: int | None = None  # augmentation processes; None: 0 on the CPU, up to 8 on a GPU
    compile: bool = False  # torch.compile the network (pays only for long runs: compiling takes minutes)

    #: field -> the option of ``imgclf train`` whose constraint (and default) it shares
    TRAIN_OPTIONS = {"epochs": "fine_tune_epochs", "unfreeze": "unfreeze", "keep_orientation": "keep_orientation"}

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise OptionError naming the first field that is out of range. The fields that
        ``imgclf train`` has options for share those options' constraints (imgclf.options)."""
        for name, option in self.TRAIN_OPTIONS.items():
            check(COMMANDS["train"][option], getattr(self, name), f"fine_tune_options.{name}")

        def whole(v, low: int) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= low

        def maybe(v, ok: Callable) -> bool:
            return v is None or ok(v)

        checks = [
            ("batch_size", whole(self.batch_size, 1), "fine-tune batch_size must be a positive integer"),
            ("learning_rate", self.learning_rate > 0, "fine-tune learning_rate must be > 0"),
            ("backbone_lr_ratio", maybe(self.backbone_lr_ratio, lambda v: v > 0), "backbone_lr_ratio must be > 0"),
            ("layer_decay", maybe(self.layer_decay, lambda v: 0 < v <= 1), "layer_decay must be in (0, 1]"),
            ("weight_decay", self.weight_decay >= 0, "fine-tune weight_decay must be >= 0"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            ("warmup_epochs", whole(self.warmup_epochs, 0), "warmup_epochs must be a whole number >= 0"),
            ("frozen_blocks", whole(self.frozen_blocks, 0), "frozen_blocks must be a whole number >= 0"),
            ("batch_norm", self.batch_norm in BATCH_NORM_MODES, f"batch_norm must be one of {', '.join(BATCH_NORM_MODES)}"),
            ("color_augment", self.color_augment in (None, True, False), "color_augment must be True, False or None"),
            ("randaugment_magnitude", maybe(self.randaugment_magnitude, lambda v: whole(v, 0) and v <= 30),
             "randaugment_magnitude must be 0 to 30"),
            ("min_crop", maybe(self.min_crop, lambda v: 0 < v <= 1), "min_crop must be in (0, 1]"),
            ("train_size", maybe(self.train_size, lambda v: whole(v, 32)), "train_size must be a whole number >= 32"),
            ("validation_fraction", 0 <= self.validation_fraction < 1, "validation_fraction must be in [0, 1)"),
            ("patience", whole(self.patience, 1), "fine-tune patience must be a positive integer"),
            ("loader_workers", maybe(self.loader_workers, lambda v: whole(v, 0)), "loader_workers must be >= 0"),
            ("compile", self.compile in (True, False), "compile must be True or False"),
        ]  # fmt: skip
        for name, ok, message in checks:
            if not ok:
                raise OptionError(f"{message}, got {getattr(self, name)!r}")


@dataclass
class Recipe:
    """The options once every automatic field is decided, with one line per decision saying why."""

    backbone_lr_ratio: float
    layer_decay: float
    batch_norm: str
    color_augment: bool
    randaugment_magnitude: int
    min_crop: float
    train_size: int
    imagenet_distance: float | None = None
    grayscale_share: float | None = None
    decisions: list[str] = field(default_factory=list)


def choose_recipe(options: FineTuneOptions, input_size: int, distance: float | None, grayscale_share: float) -> Recipe:
    """Decide every automatic field of ``options`` from what was measured on the photos.

    ``distance``: :func:`imagenet_distance` (None: not measured, taken as near
    ImageNet); ``grayscale_share``: :func:`grayscale_share`.
    """
    near = distance is None or distance < IMAGENET_DISTANCE_THRESHOLD
    if distance is None:
        why = "batch-norm distance to ImageNet not measured, taken as near"
    else:
        why = (f"the photos look {'like' if near else 'unlike'} ImageNet (batch-norm distance {distance:.3f} "
               f"{'<' if near else '>='} {IMAGENET_DISTANCE_THRESHOLD})")  # fmt: skip
    decisions: list[str] = []

    def decide(name: str, given, choices: tuple, reasons: tuple[str, str], unit: str = ""):
        if given is not None:
            decisions.append(f"{name} {given}{unit}: set by the caller")
            return given
        value, reason = (choices[0], reasons[0]) if near else (choices[1], reasons[1])
        decisions.append(f"{name} {value}{unit}: {why}, so {reason}")
        return value

    ratio = decide("backbone learning rate", options.backbone_lr_ratio, (0.2, 1.0),
                   ("the features need only a nudge", "the features must move"), " x the head's")  # fmt: skip
    decay = decide("layer decay", options.layer_decay, (0.85, 0.95),
                   ("the early layers barely move", "the early layers must move too"))  # fmt: skip
    bn = decide("batch norm", None if options.batch_norm == "auto" else options.batch_norm, ("frozen", "adapt"),
                ("ImageNet's statistics are kept", "the statistics follow the photos"))  # fmt: skip
    magnitude = decide("RandAugment magnitude", options.randaugment_magnitude, (7, 5),
                       ("strong", "milder: scans and slides carry their meaning in fine texture"))  # fmt: skip
    min_crop = decide("smallest crop", options.min_crop, (0.3, 0.5),
                      ("objects may be cropped hard", "crops keep most of a subject that fills the frame"))  # fmt: skip
    gray = grayscale_share >= 0.9
    if options.color_augment is not None:
        colour = options.color_augment
        decisions.append(f"colour augmentation {'on' if colour else 'off'}: set by the caller")
    else:
        colour = not gray
        decisions.append(f"colour augmentation {'off' if gray else 'on'}: {100 * grayscale_share:.0f}% of the "
                         f"photos are grayscale")  # fmt: skip
    if options.train_size is not None:
        size = options.train_size
        decisions.append(f"training size {size} px: set by the caller (tested at {input_size})")
    else:
        size = max(32, int(round(0.8 * input_size / 16)) * 16)
        decisions.append(f"training size {size} px, tested at {input_size} (FixRes): random crops enlarge "
                         f"objects, and a crop costs {100 * (size / input_size) ** 2:.0f}% of the test input's pixels")  # fmt: skip
    return Recipe(ratio, decay, bn, colour, magnitude, min_crop, size, distance, grayscale_share, decisions)


def decode_for_training(images: Sequence[ImageData], prep: Preprocessing, workers: int | None = None) -> list:
    """Each photo decoded once and resized so its shorter side is ``prep.resize_to``,
    as uint8 CHW tensors (a few hundred KB each): the photos a streamed run decodes one by one."""
    return list(ordered_map(partial(decode_picture, prep=prep), images, workers))


def grayscale_share(pictures: Sequence[torch.Tensor], tolerance: float = 2.0) -> float:
    """The share of ``pictures`` (uint8 CHW) whose three channels agree (mean
    difference under ``tolerance`` levels: JPEG chroma noise stays below it)."""
    if not pictures:
        return 0.0
    gray = 0
    for p in pictures:
        q = p.to(torch.int16)
        gray += float(((q[0] - q[1]).abs().float().mean() + (q[1] - q[2]).abs().float().mean()) / 2) < tolerance
    return gray / len(pictures)


@torch.no_grad()
def imagenet_distance(backbone: torch.nn.Module, x: torch.Tensor) -> float | None:
    """How far the batch ``x`` (normalised input) is from what the backbone saw in
    training: per batch-norm layer, the mean over channels of KL(N(batch mean, batch
    var) || N(running mean, running var)), averaged over layers. None without batch norm."""
    layers = [m for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    layers = [m for m in layers if m.track_running_stats and m.running_mean is not None]
    if not layers:
        return None
    divergences: list[float] = []

    def measure(module, inputs, _output) -> None:
        v = inputs[0].float()
        mean, var = v.mean((0, 2, 3)), v.var((0, 2, 3)) + module.eps
        run_mean, run_var = module.running_mean.float(), module.running_var.float() + module.eps
        # the squared shift of a mean over n photos is inflated by its sampling variance
        # (between-photo variance / n): take that off, so a small sample does not look farther
        n = v.shape[0]
        sampling = v.mean((2, 3)).var(0) / n if n > 1 else torch.zeros_like(mean)
        shift = ((mean - run_mean) ** 2 - sampling).clamp_min(0)
        kl = 0.5 * (var / run_var + shift / run_var - 1 - torch.log(var / run_var))
        divergences.append(float(kl.mean()))

    hooks = [m.register_forward_hook(measure) for m in layers]
    was_training = backbone.training
    try:
        backbone.eval()
        backbone(x)
    finally:
        for h in hooks:
            h.remove()
        backbone.train(was_training)
    return float(np.mean(divergences))


class RandAugmentOps(torch.nn.Module):
    """RandAugment restricted to the named operations (torchvision's, which draws from all 14)."""

    def __init__(self, ops: Sequence[str], magnitude: int, num_ops: int = 2):
        import torchvision.transforms.v2 as T

        super().__init__()
        self.ops = tuple(ops)
        ops_kept = self.ops

        class _Restricted(T.RandAugment):
            def _get_random_item(self, dct):
                key = ops_kept[int(torch.randint(len(ops_kept), ()))]
                return key, dct[key]

        self.augment = _Restricted(num_ops=num_ops, magnitude=magnitude)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.augment(x)


def augmentation_ops(colour: bool, keep_orientation: bool) -> tuple[str, ...]:
    """RandAugment's operations that suit the photos."""
    ops = GEOMETRIC_OPS + INTENSITY_OPS + (COLOUR_OPS if colour else ())
    return tuple(op for op in ops if not (keep_orientation and op in ORIENTATION_OPS))


def build_augmentation(recipe: Recipe, keep_orientation: bool) -> Callable:
    """Random resized crop at the training size, flip (unless orientation matters), RandAugment."""
    import torchvision.transforms.v2 as T

    steps = [T.RandomResizedCrop(recipe.train_size, scale=(recipe.min_crop, 1.0), antialias=True,
                                 interpolation=T.InterpolationMode.BICUBIC)]  # fmt: skip
    if not keep_orientation:
        steps.append(T.RandomHorizontalFlip())
    steps.append(RandAugmentOps(augmentation_ops(recipe.color_augment, keep_orientation), recipe.randaugment_magnitude))
    return T.Compose(steps)


class AugmentedPictures(torch.utils.data.Dataset):
    """Decoded photos with their labels, augmented afresh each time one is read."""

    def __init__(self, pictures: list[torch.Tensor], labels: torch.Tensor, augment: Callable):
        self.pictures, self.labels, self.augment = pictures, labels, augment

    def __len__(self) -> int:
        return len(self.pictures)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.augment(self.pictures[i]), self.labels[i]


def loader_workers(requested: int | None, device: str) -> int:
    """Augmentation worker processes, unless asked for: none on the CPU (they would
    compete with the training arithmetic for the same cores) and none where workers
    are spawned rather than forked (macOS, Windows), since spawning re-imports the
    caller's script, which breaks scripts without an ``if __name__ == "__main__"``
    guard; up to 8 for a CUDA GPU on Linux."""
    import multiprocessing

    if requested is not None:
        return requested
    if not device.startswith("cuda") or multiprocessing.get_start_method() != "fork":
        return 0
    return min(8, os.cpu_count() or 1)


def trainable_blocks(backbone: torch.nn.Module) -> list[torch.nn.Module]:
    """The backbone's blocks, input to output (what ``unfreeze`` and ``frozen_blocks`` count)."""
    for name in ("blocks", "stages", "layers"):
        stages = getattr(backbone, name, None)
        if isinstance(stages, torch.nn.Sequential):
            return [b for stage in stages for b in (stage if isinstance(stage, torch.nn.Sequential) else [stage])]
    return [m for m in backbone.children() if any(True for _ in m.parameters())]


def freeze_for_fine_tuning(backbone: torch.nn.Module, unfreeze: int | None, frozen_blocks: int = 0) -> None:
    """Make the backbone trainable except its stem and first ``frozen_blocks`` blocks;
    with ``unfreeze``, only the last ``unfreeze`` blocks and what follows them."""
    blocks = trainable_blocks(backbone)
    train_all = unfreeze is None and frozen_blocks == 0
    for p in backbone.parameters():
        p.requires_grad = train_all
    if train_all:
        return
    first = min(frozen_blocks, len(blocks))
    if unfreeze is not None:
        first = max(first, len(blocks) - unfreeze)
    for block in blocks[first:]:
        for p in block.parameters():
            p.requires_grad = True
    for name in ("conv_head", "bn2", "head", "norm", "fc_norm", "final_conv"):
        module = getattr(backbone, name, None)
        if isinstance(module, torch.nn.Module):
            for p in module.parameters():
                p.requires_grad = True


def set_batch_norm(backbone: torch.nn.Module, mode: str) -> None:
    """``frozen``: batch-norm layers use (and keep) their running statistics;
    ``adapt``: they normalise by the batch and update their running statistics."""
    for m in backbone.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.train(mode == "adapt")


@torch.no_grad()
def recalibrate_batch_norm(backbone: torch.nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Re-estimate every batch-norm layer's running statistics as the plain average
    over ``batches``. Statistics gathered in training come from small random crops;
    the test input is a larger centre crop, whose statistics differ (FixRes)."""
    layers = [m for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in layers]
    was_training = backbone.training
    backbone.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.train()
    try:
        for x in batches:
            backbone(x)
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        backbone.train(was_training)


def tie_broken(accuracy: float, loss: float) -> tuple[float, float]:
    """Validation accuracy with ties broken by the loss (a few val photos tie often; late,
    low-rate epochs are then usually as right and surer), and the loss unchanged."""
    return accuracy - 1e-4 * (min(loss, 100.0) if math.isfinite(loss) else 100.0), loss


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up for ``warmup`` steps, then a cosine down to zero at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class FineTuner:
    """Runs the fine-tuning epochs for an ImageClassifier, in place.

    After :meth:`run`, ``recipe`` holds what was decided and ``summary()`` what
    goes into the model file.
    """

    def __init__(self, model, options: FineTuneOptions, *, device: str, seed: int, tta: bool = False,
                 class_weights: torch.Tensor | None = None, callback: Callable | None = None,
                 early_stopping=None, checkpoint=None, budget=None, passes_after: int = 0):  # fmt: skip
        """``budget`` (:class:`imgclf.training.budget.TimeBudget`): the run's time limit, which the
        epochs are planned to fit; ``passes_after``: images the network still scores after the last
        epoch (what the plan keeps time for)."""
        import torchvision.transforms.v2 as T

        self.model, self.o, self.device, self.tta, self.seed = model, options, device, tta, seed
        self.callback, self.early_stopping, self.checkpoint = callback, early_stopping, checkpoint
        self.class_weights = None if class_weights is None else class_weights.to(device)
        prep = model.preprocessing
        self.center = T.CenterCrop(prep.input_size)
        self.mean = (torch.tensor(prep.mean).view(1, 3, 1, 1) * 255).to(device)
        self.std = (torch.tensor(prep.std).view(1, 3, 1, 1) * 255).to(device)
        self.generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.amp_dtype = mixed_precision_dtype(device)
        # float16 gradients underflow without loss scaling; bfloat16 and float32 need none
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.recipe: Recipe | None = None
        self.head_only_score: tuple[float, float] | None = None
        self.kept = "fine-tune"
        self.history: list[EpochMetrics] = []
        self.kept_epoch = self.best_fine_tune_epoch = 0
        self.images_per_second: list[float] = []
        self.budget, self.passes_after = budget, passes_after
        self.planned_epochs = options.epochs  # fewer when a time limit allows fewer
        self.stopped_for_time = False
        self._costs: EpochCosts | None = None  # an epoch's, once timed (a time limit only)
        self._steps = 0  # training steps an epoch
        self._net = None

    # -- measuring the photos and deciding the recipe ------------------------------------------------

    def choose(self, pictures: list[torch.Tensor]) -> Recipe:
        """Measure the photos (a sample of at most 32, centre crops) and decide the recipe."""
        o = self.o
        needs_distance = None in (o.backbone_lr_ratio, o.layer_decay, o.randaugment_magnitude, o.min_crop) or (
            o.batch_norm == "auto"
        )
        sample = [pictures[i] for i in np.linspace(0, len(pictures) - 1, min(32, len(pictures))).astype(int)]
        distance = None
        if needs_distance and sample:
            x = next(self.test_view_batches(sample, batch=len(sample)))
            distance = imagenet_distance(self.model.backbone.to(self.device), x)
        self.recipe = choose_recipe(o, self.model.preprocessing.input_size, distance, grayscale_share(sample))
        for line in self.recipe.decisions:
            log.info("fine-tune: %s", line)
        return self.recipe

    # -- the pieces of an epoch ---------------------------------------------------------------------

    def _normalize(self, crops: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW crops -> normalised float input on the device (moved as uint8: 4x less to copy)."""
        x = crops.to(self.device, non_blocking=True).float()
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)

    def _loader(self, pictures: list[torch.Tensor], y: torch.Tensor, augment: Callable) -> torch.utils.data.DataLoader:
        """Shuffled, augmented batches. The order and the workers' seeds are drawn
        from ``self.generator``, so a run, or a run resumed from a checkpoint, repeats."""
        workers = loader_workers(self.o.loader_workers, self.device)
        if self.o.loader_workers is None:  # photos streamed from disk are decoded in workers
            workers = max(workers, getattr(pictures, "loader_workers", 0))
        dataset = AugmentedPictures(pictures, y, augment)
        sampler = distributed.train_sampler(dataset, self.seed)  # under torchrun: this rank's shard
        return torch.utils.data.DataLoader(
            dataset, batch_size=self.o.batch_size, shuffle=sampler is None, sampler=sampler,
            generator=self.generator, num_workers=workers, pin_memory=self.device.startswith("cuda"),
            persistent_workers=workers > 0,  # start the workers once, not every epoch
        )  # fmt: skip

    def _forward(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        net = self._net if (train and self._net is not None) else None
        with torch.autocast("cuda", dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None):
            out = net(x) if net is not None else self.model.head(self.model.backbone(x))
            return out.float()

    def _optimizer(self, backbone: torch.nn.Module, head: torch.nn.Module) -> torch.optim.Optimizer:
        """AdamW; the backbone at ``backbone_lr_ratio`` of the head's rate, decaying by
        ``layer_decay`` per layer towards the input (timm's layer decay)."""
        from timm.optim import create_optimizer_v2

        o, r = self.o, self.recipe
        optimizer = create_optimizer_v2(backbone, "adamw", lr=o.learning_rate * r.backbone_lr_ratio,
                                        weight_decay=o.weight_decay, layer_decay=r.layer_decay)  # fmt: skip
        for group in optimizer.param_groups:
            group["lr_scale"] = group.get("lr_scale", 1.0) * r.backbone_lr_ratio
        optimizer.add_param_group({"params": list(head.parameters()), "weight_decay": o.weight_decay, "lr_scale": 1.0,
                                   "lr": o.learning_rate})  # fmt: skip
        return optimizer

    def train_epoch(self, loader, optimizer, epoch: int,
                    probe: Callable[[int, float], bool] | None = None) -> EpochMetrics | None:  # fmt: skip
        """One pass over the training photos; returns its metrics (without validation). The
        schedule spans the planned epochs; ``probe(steps done, seconds)`` runs after each step;
        True stops the epoch (None returned)."""
        o, backbone = self.o, self.model.backbone
        if hasattr(loader.sampler, "set_epoch"):  # under torchrun: a new shuffle of the shards
            loader.sampler.set_epoch(epoch)
        backbone.train()
        set_batch_norm(backbone, self.recipe.batch_norm)
        steps, warmup = len(loader), o.warmup_epochs * len(loader)
        seen = correct = 0
        loss_sum, factor = 0.0, 1.0
        started = time.perf_counter()
        for s, (crops, target) in enumerate(loader):
            factor = lr_factor(epoch * steps + s, warmup, self.planned_epochs * steps)
            for group in optimizer.param_groups:
                group["lr"] = o.learning_rate * group["lr_scale"] * factor
            x, target = self._normalize(crops), target.to(self.device, non_blocking=True)
            logits = self._forward(x, train=True)
            loss = F.cross_entropy(logits, target, weight=self.class_weights, label_smoothing=o.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
            seen += len(target)
            correct += int((logits.argmax(1) == target).sum())
            loss_sum += float(loss.detach()) * len(target)
            if probe is not None and probe(s + 1, time.perf_counter() - started):
                return None
        self.images_per_second.append(seen / max(1e-9, time.perf_counter() - started))
        distributed.sync_buffers(backbone)  # under torchrun: rank 0's batch-norm statistics on every rank
        seen, correct, loss_sum = distributed.sum_across(seen, correct, loss_sum)  # and every rank's shard
        m = EpochMetrics(epoch + 1, o.learning_rate * factor, correct / seen, loss_sum / seen)
        m.phase = "fine-tune"
        return m

    def test_view_batches(self, pictures: list[torch.Tensor], limit: int = 64, batch: int = 32):
        """Normalised centre crops at the test size, of at most ``limit`` pictures spread over the set."""
        chosen = [pictures[i] for i in np.linspace(0, len(pictures) - 1, min(limit, len(pictures))).astype(int)]
        for i in range(0, len(chosen), batch):
            yield self._normalize(torch.stack([self.center(p) for p in chosen[i : i + batch]]))

    @torch.no_grad()
    def evaluate(self, pictures: list[torch.Tensor], y: torch.Tensor) -> tuple[float, float]:
        """Accuracy and cross-entropy, centre crops, flip-averaged when ``tta``."""
        self.model.backbone.eval()
        probs = []
        mine = distributed.shard_indices(len(pictures))  # under torchrun: every N-th photo, none twice
        for i in range(0, len(mine), 32):
            x = self._normalize(torch.stack([self.center(pictures[j]) for j in mine[i : i + 32]]))
            p = torch.softmax(self._forward(x), 1)
            if self.tta:
                p = (p + torch.softmax(self._forward(torch.flip(x, dims=[3])), 1)) / 2
            probs.append(p.cpu())
        mine_p = torch.cat(probs) if probs else torch.zeros((0, self.model.head.out_features))
        p = distributed.gather_rows(mine_p, len(pictures))
        return float((p.argmax(1) == y).float().mean()), float(F.nll_loss(torch.log(p.clamp_min(1e-15)), y))

    def prepare(self, pictures: list[torch.Tensor], y: np.ndarray):
        """Decide the recipe from ``pictures``, freeze what stays frozen, and return
        the augmented training batches and the optimizer."""
        o, model = self.o, self.model
        backbone, head = model.backbone.to(self.device), model.head.to(self.device)
        backbone.to(memory_format=torch.channels_last)
        recipe = self.choose(pictures)
        freeze_for_fine_tuning(backbone, o.unfreeze, o.frozen_blocks)
        optimizer = self._optimizer(backbone, head)
        loader = self._loader(pictures, torch.from_numpy(y), build_augmentation(recipe, o.keep_orientation))
        net = distributed.wrap_for_training(backbone, head, self.device)  # DDP under torchrun, else None
        if o.compile:
            net = torch.compile(net if net is not None else torch.nn.Sequential(backbone, head))
        self._net = net
        return loader, optimizer

    # -- the run --------------------------------------------------------------------------------------

    def run(
        self,
        pictures,
        y: np.ndarray,
        val_pictures=None,
        y_val: np.ndarray | None = None,
        saved: dict | None = None,
        prior_history: list | None = None,
    ):
        """Fine-tune for at most the configured epochs (continuing ``saved`` if given).

        With validation photos, every epoch is scored on them, the head-only model
        counts as epoch 0, training stops ``patience`` epochs after the best one and
        the best epoch's weights are kept. ``prior_history`` (the head phase's epochs)
        is kept in each checkpoint, so a resumed run reports its whole history.
        Returns the fine-tune epochs' metrics and the kept epoch (0: head-only).
        """
        o = self.o
        loader, optimizer = self.prepare(pictures, y)
        backbone, head = self.model.backbone, self.model.head
        has_val = val_pictures is not None and len(val_pictures) > 0
        yv = torch.from_numpy(y_val) if has_val else None
        rule = self.early_stopping or EarlyStopping(metric="accuracy", patience=o.patience)
        best = BestEpoch(rule if has_val else None)  # over fine-tune epochs: an early dip does not end the run
        modules = {"backbone": backbone, "head": head}
        keep_head_only = has_val or self.budget is not None  # to go back to, if no epoch beats it or fits in time
        head_only = {name: copy.deepcopy(m.state_dict()) for name, m in modules.items()} if keep_head_only else None
        history: list = []
        start = 0
        if saved is not None and saved["phase"] == "fine-tune":
            self.checkpoint.restore(saved, modules, optimizer, self.generator)
            start = saved["epoch"]
            history = [EpochMetrics(**h) for h in saved["history"] if h.get("phase") == "fine-tune"]
            best.resume(saved)
            self.head_only_score = saved["extra"].get("head_only_score")
            self.planned_epochs = saved["extra"].get("planned_epochs", o.epochs)
        elif has_val:
            self.head_only_score = self.evaluate(val_pictures, yv)
        scored = (len(val_pictures) * (2 if self.tta else 1) if has_val else 0) + (
            min(64, len(pictures)) if self.recipe.batch_norm == "adapt" else 0)  # fmt: skip
        probe, self._steps = None, len(loader)
        if self.budget is not None and start == 0:
            probe = self._time_probe(len(loader), scored)
        aborted = False
        epoch = start
        while epoch < self.planned_epochs:
            epoch_started = time.perf_counter()
            m = self.train_epoch(loader, optimizer, epoch, probe if epoch == start else None)
            if m is None:  # not one epoch fits in the time limit
                aborted = True
                break
            if self.recipe.batch_norm == "adapt":
                recalibrate_batch_norm(backbone, self.test_view_batches(pictures))
            if has_val:
                m.validation_accuracy, m.validation_loss = self.evaluate(val_pictures, yv)
            history.append(m)
            if self.callback is not None:
                self.callback(m)
            stop = has_val and best.update(epoch + 1, *tie_broken(m.validation_accuracy, m.validation_loss), modules)
            if self.checkpoint is not None:
                states, extra = best.checkpoint_parts()
                extra["head_only_score"] = self.head_only_score
                extra["planned_epochs"] = self.planned_epochs
                self.checkpoint.save("fine-tune", epoch + 1, {**modules, **states}, optimizer, self.generator,
                                     [vars(h) for h in (prior_history or []) + history], extra)  # fmt: skip
            epoch += 1
            if stop or self._out_of_time(epoch, time.perf_counter() - epoch_started, scored):
                break
        best.restore_best(modules)
        kept = best.epoch if has_val else len(history)
        if aborted or (has_val and not self._beats_head_only(best, rule)):
            for name, module in modules.items():
                module.load_state_dict(head_only[name])
            kept = 0
        self.history, self.kept_epoch, self.best_fine_tune_epoch = history, kept, best.epoch
        self.kept = "head-only" if kept == 0 else "fine-tune"
        if not aborted:
            self._report_kept(kept, best, has_val)
        for p in backbone.parameters():
            p.requires_grad = False
        backbone.eval()
        head.eval()
        self._net = None
        return history, kept

    # -- the time limit -----------------------------------------------------------------------------

    def _decision(self, line: str) -> None:
        self.recipe.decisions.append(line)
        log.info("fine-tune: %s", line)

    def _epoch_costs(self, seconds: float, done: int, scored: int) -> EpochCosts:
        """An epoch's costs from ``done`` training steps that took ``seconds``; a scored image costs
        more by the test input's pixels over the training crop's."""
        pixel_ratio = (self.model.preprocessing.input_size / self.recipe.train_size) ** 2
        return EpochCosts.from_steps(seconds, done, self._steps, self.o.batch_size, scored_images=scored,
                                     passes_after=self.passes_after, pixel_ratio=pixel_ratio)  # fmt: skip

    def _time_probe(self, steps: int, scored: int) -> Callable[[int, float], bool]:
        """Times the first steps of the first epoch, then plans the epochs that fit in the time
        left (every rank takes rank 0's plan); True (stop now) when not even this epoch fits."""
        skip = 1 if steps > 3 else 0  # the first step pays one-off costs (allocations, the loader's start)
        timed = min(steps, max(3, steps // 10) + skip)
        first = 0.0  # seconds of the skipped step

        def probe(done: int, seconds: float) -> bool:
            nonlocal first
            if done == skip:
                first = seconds
            if done != timed:
                return False
            costs = self._epoch_costs(seconds - first, done - skip, scored)
            planned = epochs_that_fit(self.budget.remaining(), costs, done, self.o.epochs)
            self.planned_epochs = distributed.broadcast_object(planned)
            self._costs = costs
            self._decision(plan_line(self.planned_epochs, self.o.epochs, costs, self.budget.seconds,
                                     self.budget.elapsed()))  # fmt: skip
            return self.planned_epochs == 0

        return probe

    def _out_of_time(self, epochs_done: int, epoch_seconds: float, scored: int) -> bool:
        """After an epoch: whether another would pass the time limit (then training stops here)."""
        if self.budget is None or epochs_done >= self.planned_epochs:
            return False
        costs = self._costs
        if costs is None:  # a resumed run: its first epoch is the measure
            costs = self._epoch_costs(epoch_seconds, self._steps, scored)
        late = bool(distributed.broadcast_object(self.budget.remaining() - costs.reserve < epoch_seconds))
        if late:
            self.stopped_for_time = True
            self._decision(f"time limit {say_duration(self.budget.seconds)}: stopped after epoch {epochs_done} of "
                           f"{self.planned_epochs}: another (about {say_duration(epoch_seconds)}) would pass it")  # fmt: skip
        return late

    def _beats_head_only(self, best: BestEpoch, rule: EarlyStopping) -> bool:
        """Whether the best fine-tune epoch scored better on the validation photos than head-only."""
        if self.head_only_score is None:
            return True
        accuracy, loss = tie_broken(*self.head_only_score)
        head_only = accuracy if rule.metric == "accuracy" else -loss
        return best.epoch > 0 and best.score > head_only + rule.min_delta

    def _report_kept(self, kept: int, best: BestEpoch, has_val: bool) -> None:
        if not has_val:
            line = "kept the last epoch: no validation photos to choose by"
        else:
            scored = self.history[best.epoch - 1] if 0 < best.epoch <= len(self.history) else None
            tuned = (f"best fine-tune epoch {best.epoch}, validation accuracy {scored.validation_accuracy:.4f}, "
                     f"loss {scored.validation_loss:.4f}" if scored else "no fine-tune epoch finished")  # fmt: skip
            if kept == 0:
                line = f"kept the head-only model: it scored as well on the validation photos ({tuned}; head-only {self._score_text()})"
            else:
                line = f"kept fine-tune epoch {kept} ({tuned}; head-only {self._score_text()})"
        self._decision(line)

    def _score_text(self) -> str:
        if self.head_only_score is None:
            return "not measured"
        return f"accuracy {self.head_only_score[0]:.4f}, loss {self.head_only_score[1]:.4f}"

    def summary(self) -> dict:
        """What the model file records about this fine-tune: the recipe, why, and how fast it ran."""
        recipe = asdict(self.recipe) if self.recipe else {}
        return {
            "recipe": {k: v for k, v in recipe.items() if k != "decisions"},
            "decisions": recipe.get("decisions", []),
            "kept": self.kept,
            "best_fine_tune_epoch": self.best_fine_tune_epoch,
            "head_only_validation": None if self.head_only_score is None else {
                "accuracy": self.head_only_score[0], "loss": self.head_only_score[1]},
            "train_images_per_second": round(statistics.median(self.images_per_second), 2)
            if self.images_per_second else None,
            "planned_epochs": self.planned_epochs,
            "stopped_for_time": self.stopped_for_time,
        }  # fmt: skip


def carve_validation(
    images: Sequence[ImageData], options: FineTuneOptions, seed: int
) -> tuple[list[ImageData], list[ImageData] | None, str]:
    """Hold a stratified ``validation_fraction`` of the training photos out to
    choose the fine-tune epoch by, when every label has enough photos for it
    (at least 10). Returns (train, validation or None, the decision as a line)."""
    from collections import Counter

    from imgclf.data.splits import train_test_split

    fewest = min(Counter(im.label for im in images).values(), default=0)
    if not options.validation_fraction:
        return list(images), None, "no validation photos (validation_fraction 0): runs every epoch, keeps the last"
    if fewest < 10:
        return list(images), None, (f"no validation photos: a label has only {fewest} training photos (10 needed); "
                                    "runs every epoch, keeps the last")  # fmt: skip
    train, val = train_test_split(images, options.validation_fraction, seed)
    return train, val, (f"validation: {len(val)} of the {len(images)} training photos held out "
                        f"({100 * options.validation_fraction:.0f}%, stratified) to choose the epoch; stops "
                        f"{options.patience} epochs after the best, keeps head-only if no epoch beats it")  # fmt: skip
