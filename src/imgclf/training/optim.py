"""The head's optimizer: SGD with (Nesterov) momentum, as ``torch.optim.SGD`` computes it.

Why not ``torch.optim.SGD`` itself: constructing any ``torch.optim`` optimizer imports
``torch._dynamo`` (1.3 s on two cores), more than training the head takes, and
``imgclf train`` on cached features must stay within seconds. This is torch's
single-tensor update, step for step (``tests/test_training.py`` checks equal
weights after many steps), with the same ``state_dict`` layout, so checkpoints
(:mod:`imgclf.training.checkpoint`) read and write it unchanged. The fine-tune
phase trains the whole network and uses ``torch.optim`` as usual.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class HeadSGD:
    """``torch.optim.SGD(params, lr, momentum, nesterov, weight_decay)`` without torch.optim."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0):  # fmt: skip
        self.params = list(params)
        self.param_groups = [{"lr": lr, "momentum": momentum, "dampening": 0, "weight_decay": weight_decay,
                              "nesterov": nesterov, "maximize": False, "foreach": None, "differentiable": False,
                              "fused": None, "params": list(range(len(self.params)))}]  # fmt: skip
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            grad = p.grad
            if decay:
                grad = grad.add(p, alpha=decay)
            if momentum:
                buf = self.buffers[i]
                if buf is None:
                    buf = self.buffers[i] = torch.clone(grad).detach()
                else:
                    buf.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
                grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
            p.add_(grad, alpha=-lr)

    def state_dict(self) -> dict:
        state = {i: {"momentum_buffer": b} for i, b in enumerate(self.buffers) if b is not None}
        return {"state": state, "param_groups": [dict(g) for g in self.param_groups]}

    def load_state_dict(self, saved: dict) -> None:
        group = saved["param_groups"][0]
        self.param_groups[0].update({k: v for k, v in group.items() if k != "params"})
        for i, entry in saved["state"].items():
            buf = entry.get("momentum_buffer")
            self.buffers[int(i)] = None if buf is None else buf.clone().to(self.params[int(i)].device)


def learning_rate_at(
    epoch: int,
    base: float,
    schedule: str,
    epochs: int,
    decay_rate: float,
    decay_epochs: int,
    end_lr: float,
    power: float,
) -> float:
    """The learning rate for (0-based) ``epoch`` under ``schedule``."""
    if schedule == "exponential":  # ML.NET's ExponentialLRDecay (staircase)
        return base * decay_rate ** (epoch // decay_epochs)
    if schedule == "polynomial":  # ML.NET's PolynomialLRDecay
        frac = min(epoch, epochs) / max(1, epochs)
        return (base - end_lr) * (1 - frac) ** power + end_lr
    return base
