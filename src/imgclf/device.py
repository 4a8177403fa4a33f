"""Choosing where tensors live: CPU by default, a GPU when there is one."""

from __future__ import annotations

from imgclf.errors import OptionError

DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str = "auto") -> str:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU; others are checked."""
    import torch

    if name not in DEVICES and not name.startswith("cuda:"):
        raise OptionError(f"device must be one of {', '.join(DEVICES)}, got '{name}'")
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError("device 'cuda' asked for, but no CUDA GPU is available here; use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise OptionError("device 'mps' asked for, but Apple MPS is not available here; use --device cpu or auto")
    return name
