"""Fine-tuning: after the head converges, train the backbone too, with augmentation.

Head-only training on frozen features caps accuracy; with only a few hundred
photos a fine-tune over-fits easily, so it is done carefully: the backbone
gets a far lower learning rate than the head, decaying further layer by layer
towards the input (timm's layer decay), optionally only the last N blocks are
unfrozen, batch-norm statistics stay frozen, inputs are augmented (random
resized crop, flip, RandAugment), labels are smoothed, and the learning rate
warms up then follows a cosine. Decoded photos are cached in memory at the
network's resize size, so epochs never decode full-size JPEGs again. On a GPU
the augmentation runs in worker processes (a DataLoader), so the accelerator is
not left waiting on one CPU thread.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from imgclf.data.images import ImageData
from imgclf.data.imaging import Preprocessing, open_image, resize_shorter_side
from imgclf.data.parallel import ordered_map
from imgclf.errors import OptionError
from imgclf.nets.device import mixed_precision_dtype
from imgclf.training import distributed
from imgclf.training.history import BestEpoch, EpochMetrics


@dataclass
class FineTuneOptions:
    """Defaults chosen on the bundled flowers by 5-fold CV (benchmarks/accuracy.py)."""

    epochs: int = 10
    batch_size: int = 16
    learning_rate: float = 1e-3  # the head's; the backbone's is backbone_lr_ratio times this
    backbone_lr_ratio: float = 0.2
    layer_decay: float = 0.85
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    warmup_epochs: int = 1
    unfreeze: int | None = None  # last N blocks; None: the whole backbone
    randaugment_magnitude: int = 7
    min_crop: float = 0.3
    loader_workers: int | None = None  # augmentation processes; None: 0 on the CPU, up to 8 on an accelerator

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise OptionError naming the first field that is out of range."""
        checks = [
            ("epochs", isinstance(self.epochs, int) and self.epochs >= 1, "fine-tune epochs must be a positive integer"),
            ("batch_size", isinstance(self.batch_size, int) and self.batch_size >= 1,
             "fine-tune batch_size must be a positive integer"),
            ("learning_rate", self.learning_rate > 0, "fine-tune learning_rate must be > 0"),
            ("backbone_lr_ratio", self.backbone_lr_ratio > 0, "backbone_lr_ratio must be > 0"),
            ("layer_decay", 0 < self.layer_decay <= 1, "layer_decay must be in (0, 1]"),
            ("weight_decay", self.weight_decay >= 0, "fine-tune weight_decay must be >= 0"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            ("warmup_epochs", isinstance(self.warmup_epochs, int) and self.warmup_epochs >= 0,
             "warmup_epochs must be a whole number >= 0"),
            ("unfreeze", self.unfreeze is None or self.unfreeze >= 1, "unfreeze must be at least 1 block"),
            ("randaugment_magnitude", 0 <= self.randaugment_magnitude <= 30, "randaugment_magnitude must be 0 to 30"),
            ("min_crop", 0 < self.min_crop <= 1, "min_crop must be in (0, 1]"),
            ("loader_workers", self.loader_workers is None or self.loader_workers >= 0, "loader_workers must be >= 0"),
        ]  # fmt: skip
        for name, ok, message in checks:
            if not ok:
                raise OptionError(f"{message}, got {getattr(self, name)!r}")


def decode_for_training(images: Sequence[ImageData], prep: Preprocessing, workers: int | None = None) -> list:
    """Each photo decoded once and resized so its shorter side is ``prep.resize_to``,
    as uint8 CHW tensors (a few hundred KB each)."""

    def load(im: ImageData) -> torch.Tensor:
        img = resize_shorter_side(open_image(im.read_bytes(), im.name, draft_size=prep.resize_to), prep)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()

    return list(ordered_map(load, images, workers))


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
    """The backbone's blocks, input to output (what ``unfreeze=N`` counts from the end)."""
    if hasattr(backbone, "blocks"):
        return [b for stage in backbone.blocks for b in (stage if isinstance(stage, torch.nn.Sequential) else [stage])]
    return [m for m in backbone.children() if any(p.requires_grad for p in m.parameters())]


def freeze_for_fine_tuning(backbone: torch.nn.Module, unfreeze: int | None) -> None:
    """Make only the last ``unfreeze`` blocks (and what follows them) trainable."""
    for p in backbone.parameters():
        p.requires_grad = unfreeze is None
    if unfreeze is None:
        return
    blocks = trainable_blocks(backbone)
    for block in blocks[max(0, len(blocks) - unfreeze) :]:
        for p in block.parameters():
            p.requires_grad = True
    for name in ("conv_head", "bn2", "head", "norm", "fc_norm", "final_conv"):
        module = getattr(backbone, name, None)
        if isinstance(module, torch.nn.Module):
            for p in module.parameters():
                p.requires_grad = True


def _freeze_batch_norm(module: torch.nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


class FineTuner:
    """Runs the fine-tuning epochs for an ImageClassifier, in place."""

    def __init__(self, model, options: FineTuneOptions, *, device: str, seed: int, tta: bool = False,
                 class_weights: torch.Tensor | None = None, callback: Callable | None = None,
                 early_stopping=None, checkpoint=None):  # fmt: skip
        import torchvision.transforms.v2 as T

        self.model, self.o, self.device, self.tta, self.seed = model, options, device, tta, seed
        self.callback, self.early_stopping, self.checkpoint = callback, early_stopping, checkpoint
        self.class_weights = None if class_weights is None else class_weights.to(device)
        prep = model.preprocessing
        self.augment = T.Compose([
            T.RandomResizedCrop(prep.input_size, scale=(options.min_crop, 1.0), antialias=True,
                                interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.RandAugment(num_ops=2, magnitude=options.randaugment_magnitude),
        ])  # fmt: skip
        self.center = T.CenterCrop(prep.input_size)
        self.mean = (torch.tensor(prep.mean).view(1, 3, 1, 1) * 255).to(device)
        self.std = (torch.tensor(prep.std).view(1, 3, 1, 1) * 255).to(device)
        self.generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.amp_dtype = mixed_precision_dtype(device)
        # float16 gradients underflow without loss scaling; bfloat16 and float32 need none
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

    def _normalize(self, crops: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW crops -> normalised float input on the device (moved as uint8: 4x less to copy)."""
        x = crops.to(self.device, non_blocking=True).float()
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)

    def _loader(self, pictures: list[torch.Tensor], y: torch.Tensor) -> torch.utils.data.DataLoader:
        """Shuffled, augmented batches. The order and the workers' seeds are drawn
        from ``self.generator``, so a run, or a run resumed from a checkpoint, repeats."""
        workers = loader_workers(self.o.loader_workers, self.device)
        if self.o.loader_workers is None:  # photos streamed from disk are decoded in workers
            workers = max(workers, getattr(pictures, "loader_workers", 0))
        dataset = AugmentedPictures(pictures, y, self.augment)
        sampler = distributed.train_sampler(dataset, self.seed)  # under torchrun: this rank's shard
        return torch.utils.data.DataLoader(
            dataset, batch_size=self.o.batch_size, shuffle=sampler is None, sampler=sampler,
            generator=self.generator, num_workers=workers, pin_memory=self.device.startswith("cuda"),
            persistent_workers=workers > 0,  # start the workers once, not every epoch
        )  # fmt: skip

    def _forward(self, x: torch.Tensor, net: torch.nn.Module | None = None) -> torch.Tensor:
        with torch.autocast("cuda", dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None):
            return (net(x) if net is not None else self.model.head(self.model.backbone(x))).float()

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

    def run(
        self,
        pictures,
        y: np.ndarray,
        val_pictures=None,
        y_val: np.ndarray | None = None,
        saved: dict | None = None,
        prior_history: list | None = None,
    ):
        """Fine-tune for the configured epochs (continuing ``saved`` if given).

        ``prior_history`` (the head phase's epochs) is kept in each checkpoint,
        so a resumed run reports its whole history.
        """
        from timm.optim import create_optimizer_v2

        o, model = self.o, self.model
        backbone, head = model.backbone.to(self.device), model.head.to(self.device)
        backbone.to(memory_format=torch.channels_last)
        freeze_for_fine_tuning(backbone, o.unfreeze)
        optimizer = create_optimizer_v2(backbone, "adamw", lr=o.learning_rate * o.backbone_lr_ratio,
                                        weight_decay=o.weight_decay, layer_decay=o.layer_decay)  # fmt: skip
        for group in optimizer.param_groups:
            group["lr_scale"] = group.get("lr_scale", 1.0) * o.backbone_lr_ratio
        optimizer.add_param_group({"params": list(head.parameters()), "weight_decay": o.weight_decay, "lr_scale": 1.0,
                                   "lr": o.learning_rate})  # fmt: skip
        loader = self._loader(pictures, torch.from_numpy(y))
        yv = None if y_val is None else torch.from_numpy(y_val)
        steps_per_epoch = len(loader)
        total, warmup = o.epochs * steps_per_epoch, o.warmup_epochs * steps_per_epoch
        history: list = []
        best = BestEpoch(self.early_stopping)
        start = 0
        modules = {"backbone": backbone, "head": head}
        if saved is not None and saved["phase"] == "fine-tune":
            self.checkpoint.restore(saved, modules, optimizer, self.generator)
            start = saved["epoch"]
            history = [EpochMetrics(**h) for h in saved["history"] if h.get("phase") == "fine-tune"]
            best.resume(saved)
        net = distributed.wrap_for_training(backbone, head, self.device)  # DDP under torchrun, else None
        for epoch in range(start, o.epochs):
            if hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(epoch)
            backbone.train()
            _freeze_batch_norm(backbone)
            seen = correct = 0
            loss_sum = 0.0
            for s, (crops, target) in enumerate(loader):
                step = epoch * steps_per_epoch + s
                factor = (step + 1) / max(1, warmup) if step < warmup else 0.5 * (
                    1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))  # fmt: skip
                for group in optimizer.param_groups:
                    group["lr"] = o.learning_rate * group["lr_scale"] * factor
                x, target = self._normalize(crops), target.to(self.device, non_blocking=True)
                logits = self._forward(x, net)
                loss = F.cross_entropy(logits, target, weight=self.class_weights, label_smoothing=o.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(optimizer)
                self.scaler.update()
                seen += len(target)
                correct += int((logits.argmax(1) == target).sum())
                loss_sum += float(loss.detach()) * len(target)
            distributed.sync_buffers(backbone)  # under torchrun: rank 0's batch-norm statistics on every rank
            seen, correct, loss_sum = distributed.sum_across(seen, correct, loss_sum)  # and every rank's shard
            m = EpochMetrics(epoch + 1, o.learning_rate * factor, correct / seen, loss_sum / seen)
            if val_pictures is not None and len(val_pictures):
                m.validation_accuracy, m.validation_loss = self.evaluate(val_pictures, yv)
            m.phase = "fine-tune"
            history.append(m)
            if self.callback is not None:
                self.callback(m)
            stop = m.validation_accuracy is not None and best.update(
                epoch + 1, m.validation_accuracy, m.validation_loss, modules
            )
            if self.checkpoint is not None:
                states, extra = best.checkpoint_parts()
                self.checkpoint.save("fine-tune", epoch + 1, {**modules, **states}, optimizer, self.generator,
                                     [vars(h) for h in (prior_history or []) + history], extra)  # fmt: skip
            if stop:
                break
        best.restore_best(modules)
        for p in backbone.parameters():
            p.requires_grad = False
        backbone.eval()
        head.eval()
        return history, best.epoch or len(history)
