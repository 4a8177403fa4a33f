"""Writing files safely: atomically, with the user's permissions, never over an input.

The content goes to a temporary file beside the target, which is renamed over
the target only once it is complete (``os.replace`` is atomic on one file system),
so a crash or a full disk never leaves a half-written file. The temporary file is
created the way ``open()`` creates files, so a new file gets the permissions the
umask allows (not ``mkstemp``'s 0600), and a replaced file keeps its own.

Outputs are checked before the work that produces them starts
(:func:`check_output_path`), so a typo in ``--out`` costs a second, not a
finished training run.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from imgclf.errors import ModelFileError, OptionError


def _create_temporary(folder: Path, name: str) -> Path:
    """A new empty file in ``folder``, created with mode 0666 less the umask."""
    for _ in range(100):
        tmp = folder / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {folder}")


def _existing_kind(path: Path) -> str | None:
    """None when nothing is at ``path``; else "file", "folder" or "special"."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return "file"
    return "folder" if stat.S_ISDIR(mode) else "special"


@contextmanager
def atomic_path(path: Path, what: str = "file") -> Iterator[str]:
    """Yields a temporary path to write; it becomes ``path`` when the block succeeds.

    Any OSError becomes a one-line :class:`ModelFileError` naming ``path``.
    """
    path = Path(path)
    kind = _existing_kind(path)
    if kind == "folder":
        raise ModelFileError(f"{path}: is a folder; give a file name for the {what}")
    if kind == "special":
        raise ModelFileError(f"{path}: is not a regular file; cannot write the {what} there")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_temporary(path.parent, path.name)
        # A new file gets what the umask allows (read back from the file just created);
        # a replaced file keeps its own permissions.
        mode = stat.S_IMODE((path if kind == "file" else tmp).stat().st_mode)
    except OSError as e:
        raise ModelFileError(f"{path}: cannot write {what} here ({e.strerror or e})") from None
    try:
        yield str(tmp)
        os.chmod(tmp, mode)  # again: writers such as safetensors replace the file with a 0600 one
        os.replace(tmp, path)
    except OSError as e:
        raise ModelFileError(f"{path}: cannot write {what} ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str, what: str = "file") -> Path:
    """Write ``text`` to ``path`` atomically; a pipe or device (``/dev/stdout``) is written directly."""
    path = Path(path)
    if _existing_kind(path) == "special":
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as e:
            raise ModelFileError(f"{path}: cannot write {what} ({e.strerror or e})") from None
        return path
    with atomic_path(path, what) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return path


def check_output_path(path: str | Path, what: str, *, option: str | None = None, stream_ok: bool = False,
                      model: str | None = None) -> Path:  # fmt: skip
    """Raises :class:`OptionError` now if writing ``what`` to ``path`` would fail later.

    The nearest existing folder on the way to ``path`` must accept a new file (it is
    tried, since permission bits do not tell about read-only file systems or root);
    missing folders below it are created when the file is written. ``stream_ok``
    accepts a pipe or device such as ``/dev/stdout``. ``model`` (``"safetensors"`` or
    ``"onnx"``, the kind about to be written): a file already there is replaced only if it is
    a model of that kind (an image or notes typed as the name are kept, and a trained model is
    not turned into its export, nor an export into a file other runtimes cannot read).
    """
    path = Path(path)
    label = f"{option} {path}" if option else str(path)
    kind = _existing_kind(path)
    if kind == "folder":
        raise OptionError(f"{label}: is a folder; give a file name for the {what}")
    if kind == "file" and model:
        _check_replaceable_model(path, label, what, model)
    if kind == "special":
        if stream_ok:
            return path
        raise OptionError(f"{label}: is not a regular file; give a file name for the {what}")
    _check_can_create(path.parent, label, what)
    return path


def _check_replaceable_model(path: Path, label: str, what: str, writing: str) -> None:
    from imgclf.filetypes import WHAT_IT_IS, sniff

    try:
        kind = sniff(path)
    except OSError:
        return  # unreadable: writing it will say why
    if kind in ("torch", "unknown"):  # a model (even an empty or cut-short one) may be replaced
        raise OptionError(f"{label}: exists and is not a model file ({WHAT_IT_IS[kind]}); writing the {what} "
                          "there would destroy it: remove it first, or give another name")  # fmt: skip
    other = {"safetensors": "onnx", "onnx": "safetensors"}[writing]
    if kind == other or (kind == "truncated" and writing == "onnx"):
        said = "an exported ONNX model" if other == "onnx" else "a trained imgclf model (safetensors)"
        raise OptionError(f"{label}: is {said}; writing the {what} there would replace it with the other "
                          "format: give another name, or remove it first")  # fmt: skip


def _check_can_create(folder: Path, label: str, what: str) -> None:
    """The nearest existing folder on the way to ``folder`` accepts a new file (it is tried)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OptionError(f"{label}: cannot write the {what} there ({folder} is a file, not a folder)")
    try:
        _create_temporary(folder, "imgclf-write-test").unlink()
    except OSError as e:
        raise OptionError(f"{label}: cannot write the {what} in {folder} ({e.strerror or e})") from None


def check_output_folder(path: str | Path, what: str, *, option: str | None = None) -> Path:
    """Raises :class:`OptionError` now if ``what`` (a folder of files) could not be written at ``path``."""
    path = Path(path)
    label = f"{option} {path}" if option else str(path)
    if path.exists() and not path.is_dir():
        raise OptionError(f"{label}: exists and is not a folder; give a folder for the {what}")
    _check_can_create(path, label, what)
    return path


def check_not_an_input(path: str | Path, inputs: Iterable[str | Path], what: str, *, option: str | None = None) -> None:
    """Raises :class:`OptionError` if ``path`` is one of ``inputs`` (same file, by inode)."""
    path = Path(path)
    try:
        out = path.stat()
    except OSError:
        return  # not there yet, so it cannot be an input
    for source in inputs:
        try:
            st = os.stat(source)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (out.st_dev, out.st_ino):
            label = f"{option} {path}" if option else str(path)
            raise OptionError(f"{label}: is also an input ({source}); writing the {what} there would destroy it")
