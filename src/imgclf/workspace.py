"""What training leaves in the workspace, and clearing it.

The workspace (``~/.cache/imgclf`` unless told otherwise) holds one cached
feature vector per image and architecture, and the checkpoint of any run that
did not finish. Neither is needed to use a trained model, and the cache never
evicts on its own, so ``imgclf cache`` shows its size and ``--clear`` empties
it. Only files imgclf itself names are touched: pointing ``--workspace`` at a
folder with other things in it cannot lose them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_FEATURE_FILE = re.compile(r"[0-9a-f]{64}\.npy")
_CHECKPOINT_FILE = re.compile(r"[0-9a-f]{20}\.safetensors")


@dataclass
class WorkspaceUsage:
    """Counts and bytes of imgclf's own files in one workspace."""

    path: Path
    feature_files: int = 0
    feature_bytes: int = 0
    feature_sets: int = 0  # distinct architecture + weights + preprocessing keys
    checkpoints: int = 0
    checkpoint_bytes: int = 0


def _feature_files(workspace: Path) -> list[Path]:
    """``features/<key>/<xx>/<sha256>.npy``, nothing else."""
    return [
        p for p in (workspace / "features").glob("*/*/*.npy")
        if _FEATURE_FILE.fullmatch(p.name) and p.parent.name == p.name[:2]
    ]  # fmt: skip


def _checkpoint_files(workspace: Path) -> list[Path]:
    return [p for p in (workspace / "checkpoints").glob("*.safetensors") if _CHECKPOINT_FILE.fullmatch(p.name)]


def workspace_usage(workspace: str | Path) -> WorkspaceUsage:
    """What :func:`clear_workspace` would remove."""
    workspace = Path(workspace)
    features, checkpoints = _feature_files(workspace), _checkpoint_files(workspace)
    return WorkspaceUsage(
        workspace,
        feature_files=len(features),
        feature_bytes=sum(p.stat().st_size for p in features),
        feature_sets=len({p.parent.parent.name for p in features}),
        checkpoints=len(checkpoints),
        checkpoint_bytes=sum(p.stat().st_size for p in checkpoints),
    )


def clear_workspace(workspace: str | Path) -> WorkspaceUsage:
    """Delete the cached features and leftover checkpoints; returns what was removed.

    Folders left empty are removed too; anything else stays.
    """
    removed = workspace_usage(workspace)
    workspace = Path(workspace)
    for path in _feature_files(workspace) + _checkpoint_files(workspace):
        path.unlink(missing_ok=True)
    for folder in (
        sorted((workspace / "features").glob("*/*"), reverse=True)
        + sorted((workspace / "features").glob("*"))
        + [workspace / "features", workspace / "checkpoints"]
    ):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return removed
