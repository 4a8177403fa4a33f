"""Per-epoch training checkpoints in the workspace, for ``--resume`` and Ctrl-C.

A checkpoint is a safetensors file (no pickle) holding the trainable modules,
the optimizer's tensors, the random-number states, and as JSON metadata the
phase ("head" or "fine-tune"), the last finished epoch and the history so far.
It is keyed by the run (images and options), so ``--resume`` only ever
continues the same run. It outlives ``fit``: it is removed when the trained
model is saved, so a run whose model could not be written (a full disk, a bad
``--out``) is finished by ``--resume`` in seconds. A checkpoint that cannot be
written stops checkpointing with one warning; it never stops training.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from imgclf.atomic import atomic_path
from imgclf.errors import ImgclfError
from imgclf.errors import TrainingInterrupted as TrainingInterrupted  # its old home: still importable from here
from imgclf.nets.workspace import checkpoint_file
from imgclf.training.distributed import is_main_process


def run_key(image_names: list[str], params: dict[str, Any]) -> str:
    """What identifies a run: its images (name and size) and its options."""
    h = hashlib.sha256()
    for name in sorted(image_names):
        try:
            size = Path(name).stat().st_size
        except OSError:
            size = -1
        h.update(f"{name}\0{size}\n".encode("utf-8", "surrogateescape"))  # names from other systems: any bytes
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


class Checkpoint:
    def __init__(self, workspace: str | Path, key: str):
        self.path = checkpoint_file(workspace, key)
        self.failed = False

    def save(self, phase: str, epoch: int, modules: dict[str, torch.nn.Module | dict], optimizer: torch.optim.Optimizer,
             generator: torch.Generator, history: list[dict], extra: dict | None = None) -> None:  # fmt: skip
        from safetensors.torch import save_file

        if self.failed or not is_main_process():  # under torchrun, rank 0 alone writes it
            return
        tensors: dict[str, torch.Tensor] = {}
        for prefix, module in modules.items():  # a module, or a state dict already taken
            state = module if isinstance(module, dict) else module.state_dict()
            for k, v in state.items():
                tensors[f"{prefix}.{k}"] = v.detach().cpu().contiguous()
        opt_state = optimizer.state_dict()
        for idx, state in opt_state["state"].items():
            for name, value in state.items():
                tensor = value if torch.is_tensor(value) else torch.tensor(value)
                tensors[f"optimizer.{idx}.{name}"] = tensor.detach().cpu().contiguous()
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.generator"] = generator.get_state()
        meta = {"phase": phase, "epoch": epoch, "history": history, "param_groups": opt_state["param_groups"],
                "extra": extra or {}}  # fmt: skip
        try:
            with atomic_path(self.path, "checkpoint") as tmp:
                save_file(tensors, tmp, metadata={"imgclf_checkpoint": json.dumps(meta, default=str)})
        except ImgclfError as e:
            self.failed = True
            warnings.warn(f"checkpoint: {e}; training goes on without checkpoints, so --resume cannot continue "
                          "this run", stacklevel=2)  # fmt: skip

    def load(self) -> dict[str, Any] | None:
        """The checkpoint's contents, or None when there is none (or it is unreadable)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        if not self.path.is_file():
            return None
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = json.loads(f.metadata()["imgclf_checkpoint"])
            tensors = load_file(str(self.path))
        except Exception:
            return None
        meta["tensors"] = tensors
        return meta

    def restore(self, saved: dict, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                generator: torch.Generator) -> None:  # fmt: skip
        tensors = saved["tensors"]
        for prefix, module in modules.items():
            module.load_state_dict({k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")})
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
        torch.set_rng_state(tensors["rng.torch"])
        generator.set_state(tensors["rng.generator"])

    def remove(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass  # a checkpoint left behind costs disk space, not a run; `imgclf cache --clear` removes it
