"""Choosing where tensors live: CPU by default, a GPU when there is one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from imgclf.options import DEVICES as DEVICES  # the names live in imgclf.options
from imgclf.options import NETWORK, option_error, validate

if TYPE_CHECKING:
    import torch


def resolve_device(name: str = "auto") -> str:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU; others are checked."""
    import torch

    validate(NETWORK, {"device": name})
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise option_error("device", "{device} {given} asked for, but no CUDA GPU is available here; use {device} cpu "
                                     "or auto", given=name)  # fmt: skip
    if name == "mps" and not torch.backends.mps.is_available():
        raise option_error("device", "{device} mps asked for, but Apple MPS is not available here; use {device} cpu "
                                     "or auto")  # fmt: skip
    return name


def mixed_precision_dtype(device: str) -> torch.dtype | None:
    """The autocast type for training on ``device``: bfloat16 on GPUs that have it
    (Ampere and later), float16 on older CUDA GPUs (T4, V100; needs loss scaling),
    none elsewhere: the CPU and MPS train in float32."""
    import torch

    if not device.startswith("cuda"):
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
