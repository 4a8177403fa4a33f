"""Writing files atomically: a crash or full disk never leaves a half-written file.

The content goes to a temporary file beside the target, which is renamed over
the target only once it is complete (``os.replace`` is atomic on one file system).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from imgclf.errors import ModelFileError


@contextmanager
def atomic_path(path: Path, what: str = "file") -> Iterator[str]:
    """Yields a temporary path to write; it becomes ``path`` when the block succeeds.

    Any OSError becomes a one-line :class:`ModelFileError` naming ``path``.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        raise ModelFileError(f"{path}: cannot write {what} here ({e.strerror or e})") from None
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise ModelFileError(f"{path}: cannot write {what} ({e.strerror or e})") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
