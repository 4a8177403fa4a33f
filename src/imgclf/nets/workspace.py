"""The workspace's layout, what training leaves there, and clearing it.

The feature cache and the checkpoints name their files through this module,
so the one place that knows the layout also decides what may be deleted. The
workspace (``~/.cache/imgclf`` unless told otherwise) holds one cached
feature vector per image and architecture, and the checkpoint of any run that
did not finish. Neither is needed to use a trained model, and the cache never
evicts on its own, so ``imgclf cache`` shows its size and ``--clear`` empties
it. Only files imgclf itself names are touched: pointing ``--workspace`` at a
folder with other things in it cannot lose them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

FEATURES, CHECKPOINTS = "features", "checkpoints"
_FEATURE_FILE = re.compile(r"[0-9a-f]{64}\.npy")  # a SHA-256 of the image's bytes
_CHECKPOINT_FILE = re.compile(r"[0-9a-f]{20}\.safetensors")  # a run key (checkpoint.run_key)


def default_workspace() -> Path:
    """``$IMGCLF_WORKSPACE``, else the user's cache folder."""
    if os.environ.get("IMGCLF_WORKSPACE"):
        return Path(os.environ["IMGCLF_WORKSPACE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "imgclf"


def feature_folder(workspace: str | Path, key: str) -> Path:
    """Where the vectors of one architecture + weights + preprocessing live."""
    return Path(workspace) / FEATURES / key


def feature_file(folder: Path, digest: str) -> Path:
    """One image's vector in ``folder``, fanned out by the first two hex digits."""
    return folder / digest[:2] / f"{digest}.npy"


BACKBONE_FILE = "backbone.safetensors"


def backbone_file(folder: Path) -> Path:
    """The pretrained backbone's tensors beside its features: a run whose features are all
    cached saves its model from these without building the network (no timm import)."""
    return folder / BACKBONE_FILE


def checkpoint_file(workspace: str | Path, key: str) -> Path:
    """The checkpoint of the run ``key``."""
    return Path(workspace) / CHECKPOINTS / f"{key}.safetensors"


@dataclass
class WorkspaceUsage:
    """Counts and bytes of imgclf's own files in one workspace."""

    path: Path
    feature_files: int = 0
    feature_bytes: int = 0
    feature_sets: int = 0  # distinct architecture + weights + preprocessing keys
    checkpoints: int = 0
    checkpoint_bytes: int = 0


def _own_files(workspace: Path) -> tuple[list[Path], list[Path]]:
    """The feature vectors and checkpoints in ``workspace`` named as above, nothing else."""
    features = [
        p for p in (workspace / FEATURES).glob("*/*/*.npy")
        if _FEATURE_FILE.fullmatch(p.name) and feature_file(p.parent.parent, p.stem) == p
    ] + [p for p in (workspace / FEATURES).glob(f"*/{BACKBONE_FILE}")]  # fmt: skip
    checkpoints = [p for p in (workspace / CHECKPOINTS).glob("*.safetensors") if _CHECKPOINT_FILE.fullmatch(p.name)]
    return features, checkpoints


def _usage(workspace: Path, features: list[Path], checkpoints: list[Path]) -> WorkspaceUsage:
    return WorkspaceUsage(
        workspace,
        feature_files=sum(p.name != BACKBONE_FILE for p in features),
        feature_bytes=sum(p.stat().st_size for p in features),
        feature_sets=len({p.parent.parent.name for p in features if p.name != BACKBONE_FILE}),
        checkpoints=len(checkpoints),
        checkpoint_bytes=sum(p.stat().st_size for p in checkpoints),
    )


def workspace_usage(workspace: str | Path) -> WorkspaceUsage:
    """What :func:`clear_workspace` would remove."""
    workspace = Path(workspace)
    return _usage(workspace, *_own_files(workspace))


def clear_workspace(workspace: str | Path) -> WorkspaceUsage:
    """Delete the cached features and leftover checkpoints; returns what was removed.

    Folders left empty are removed too; anything else stays.
    """
    workspace = Path(workspace)
    features, checkpoints = _own_files(workspace)
    removed = _usage(workspace, features, checkpoints)
    for path in features + checkpoints:
        path.unlink(missing_ok=True)
    for folder in (
        sorted((workspace / FEATURES).glob("*/*"), reverse=True)
        + sorted((workspace / FEATURES).glob("*"))
        + [workspace / FEATURES, workspace / CHECKPOINTS]
    ):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return removed
