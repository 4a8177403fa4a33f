"""What one epoch measured, and early stopping: shared by the head and fine-tune loops."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from imgclf.options import COMMANDS, check


@dataclass
class EpochMetrics:
    """What the metrics callback receives after every epoch."""

    epoch: int
    learning_rate: float
    train_accuracy: float
    train_loss: float
    validation_accuracy: float | None = None
    validation_loss: float | None = None
    phase: str = "head"  # or "fine-tune"

    def __str__(self) -> str:
        text = (f"{'fine-tune ' if self.phase == 'fine-tune' else ''}epoch {self.epoch:3d}  lr {self.learning_rate:.5f}  "
                f"train acc {self.train_accuracy:.4f} loss {self.train_loss:.4f}")  # fmt: skip
        if self.validation_accuracy is not None:
            text += f"  val acc {self.validation_accuracy:.4f} loss {self.validation_loss:.4f}"
        return text


@dataclass
class EarlyStopping:
    """Stop when ``metric`` has not improved by ``min_delta`` for ``patience`` epochs.

    Watches validation metrics when there is a validation set, else training
    metrics. The best epoch's weights are restored at the end.
    """

    metric: str = "accuracy"  # or "loss"
    min_delta: float = 0.0
    patience: int = 10

    #: field -> the option of ``imgclf train`` whose constraint (and default) it shares
    OPTIONS = {"metric": "early_stopping_metric", "min_delta": "min_delta", "patience": "patience"}

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise OptionError naming the first field that is out of range (``early_stopping.patience``)."""
        for name, option in self.OPTIONS.items():
            check(COMMANDS["train"][option], getattr(self, name), f"early_stopping.{name}")


@dataclass
class BestEpoch:
    """Early-stopping bookkeeping, shared by the head and fine-tune phases: the
    best score so far, its epoch, epochs since, and that epoch's weights."""

    rule: EarlyStopping | None
    score: float = -math.inf
    epoch: int = 0
    waited: int = 0
    states: dict[str, dict] | None = None  # state dict per module name, at the best epoch

    def update(self, epoch: int, accuracy: float, loss: float, modules: dict) -> bool:
        """Record one epoch's watched metrics; True when patience has run out."""
        if self.rule is None:
            return False
        score = accuracy if self.rule.metric == "accuracy" else -loss
        if score > self.score + self.rule.min_delta:
            self.score, self.epoch, self.waited = score, epoch, 0
            self.states = {name: copy.deepcopy(m.state_dict()) for name, m in modules.items()}
            return False
        self.waited += 1
        return self.waited >= self.rule.patience

    def checkpoint_parts(self) -> tuple[dict[str, dict], dict]:
        """What a checkpoint keeps of this: the best weights and the counters."""
        states = {f"best_{name}": state for name, state in (self.states or {}).items()}
        return states, {"score": self.score, "best_epoch": self.epoch, "waited": self.waited}

    def resume(self, saved: dict) -> None:
        """Continue from what :meth:`checkpoint_parts` stored."""
        extra = saved["extra"]
        self.score, self.epoch, self.waited = (
            extra.get("score", -math.inf),
            extra.get("best_epoch", 0),
            extra.get("waited", 0),
        )
        states: dict[str, dict] = {}
        for key, value in saved["tensors"].items():
            if key.startswith("best_"):
                name, _, param = key[len("best_") :].partition(".")
                states.setdefault(name, {})[param] = value
        self.states = states or None

    def restore_best(self, modules: dict) -> None:
        """Load the best epoch's weights back into ``modules``, if one was kept."""
        for name, module in modules.items():
            if self.states and name in self.states:
                module.load_state_dict(self.states[name])
