"""Where the images to score come from: files, folders, globs, manifests, URIs.

An INPUT is one of:

- an image file (always scored, whatever its extension);
- a folder, walked recursively in sorted order (files with an image extension);
- a glob (``photos/**/*.jpg``), its matches sorted; folders it matches are walked;
- a manifest: a ``.txt`` with one path per line (blank lines and ``#`` comments
  skipped), or a ``.csv`` / ``.parquet`` with a ``path`` column. Manifests are
  streamed, never listed into memory. Relative entries are taken relative to the
  manifest's own folder, so a manifest can travel with its images;
- any of these as a URI (``s3://``, ``gs://``, ...), read through fsspec when the
  matching filesystem package is installed.

Paths come out as strings, in the same order and spelling as ``imgclf predict``
prints them for local files and folders.
"""

from __future__ import annotations

import csv
import glob
import io
import os
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from imgclf.data.images import IMAGE_EXTENSIONS
from imgclf.data.uris import filesystem, is_uri  # noqa: F401  (re-exported: where they used to live)
from imgclf.errors import DataError, ImageDecodeError, MissingDependencyError
from imgclf.options import install_hint

MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet")
GLOB_CHARS = frozenset("*?[")

InputKind = Literal["file", "folder", "glob", "manifest"]


def _has_image_suffix(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


@dataclass(frozen=True)
class Input:
    """One INPUT as given on the command line, with what it turned out to be."""

    text: str
    kind: InputKind

    @property
    def is_uri(self) -> bool:
        return is_uri(self.text)


def classify_inputs(inputs: Sequence[str | Path]) -> list[Input]:
    """Check every INPUT before any work: a missing file, an empty glob or a
    manifest without a ``path`` column is a one-line :class:`DataError`."""
    if not inputs:
        raise DataError("no inputs given: name image files, folders, globs or manifests")
    classified = []
    for raw in inputs:
        text = str(raw)
        kind = _classify(text)
        if kind == "manifest":
            _check_manifest(text)
        classified.append(Input(text, kind))
    return classified


def _classify(text: str) -> InputKind:
    if is_uri(text):
        fs, path = filesystem(text)
        if GLOB_CHARS & set(path):
            if not fs.glob(path):
                raise DataError(f"{text}: matches no files")
            return "glob"
        try:
            if fs.isdir(path):
                return "folder"
            exists = fs.isfile(path)
        except Exception as e:  # any filesystem's own error: permissions, network
            raise DataError(f"{text}: cannot be read ({type(e).__name__}: {e})") from None
        if not exists:
            raise DataError(f"{text}: no such file or folder")
        return "manifest" if text.lower().endswith(MANIFEST_SUFFIXES) else "file"
    if os.path.isdir(text):
        return "folder"
    if os.path.isfile(text):
        return "manifest" if text.lower().endswith(MANIFEST_SUFFIXES) else "file"
    if GLOB_CHARS & set(text):
        if next(glob.iglob(text, recursive=True), None) is None:
            raise DataError(f"{text}: matches no files")
        return "glob"
    raise DataError(f"{text}: no such file or folder")


def iter_image_paths(inputs: Sequence[Input]) -> Iterator[str]:
    """Every image path the inputs name, streamed, in order."""
    for item in inputs:
        if item.kind == "manifest":
            yield from iter_manifest(item.text)
        elif item.is_uri:
            yield from _iter_uri(item)
        elif item.kind == "file":
            yield str(Path(item.text))
        elif item.kind == "folder":
            yield from _walk_local(str(Path(item.text)))
        else:
            for match in sorted(glob.glob(item.text, recursive=True)):
                if os.path.isdir(match):
                    yield from _walk_local(str(Path(match)))
                elif _has_image_suffix(match):
                    yield str(Path(match))


def _walk_local(folder: str) -> Iterator[str]:
    """Image files below ``folder`` in the order ``sorted(Path.rglob(...))`` gives,
    holding one folder's listing at a time rather than the whole tree's."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _walk_local(entry.path)
        elif _has_image_suffix(entry.name) and _is_file(entry):
            yield entry.path


def _is_file(entry: os.DirEntry) -> bool:
    """A file, or a link that cannot be followed (a loop, no permission): the latter becomes an
    error row naming why, as plain ``predict`` reports it, instead of stopping the walk."""
    try:
        return entry.is_file()
    except OSError:
        return True


def _iter_uri(item: Input) -> Iterator[str]:
    fs, path = filesystem(item.text)
    if item.kind == "file":
        yield item.text
        return
    if item.kind == "folder":
        yield from _walk_fs(fs, path, item.text.rstrip("/"))
        return
    for match in sorted(fs.glob(path)):
        if fs.isdir(match):
            yield from _walk_fs(fs, match, fs.unstrip_protocol(match).rstrip("/"))
        elif _has_image_suffix(match):
            yield fs.unstrip_protocol(match)


def _walk_fs(fs, folder: str, spelled: str) -> Iterator[str]:
    """Like :func:`_walk_local`; paths start as the user spelled the folder."""
    for entry in sorted(fs.ls(folder, detail=True), key=lambda e: e["name"]):
        name = entry["name"].rstrip("/")
        if name == folder.rstrip("/"):
            continue
        uri = f"{spelled}/{posixpath.basename(name)}"
        if entry["type"] == "directory":
            yield from _walk_fs(fs, name, uri)
        elif _has_image_suffix(name):
            yield uri


# --- manifests ---


def _open_text(path: str):
    if is_uri(path):
        fs, bare = filesystem(path)
        return io.TextIOWrapper(fs.open(bare, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _open_binary(path: str):
    if is_uri(path):
        fs, bare = filesystem(path)
        return fs.open(bare, "rb")
    return open(path, "rb")


def _parquet_file(path: str, handle):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependencyError(f"{path}: Parquet manifests need pyarrow: {install_hint('batch')}") from None
    try:
        return pq.ParquetFile(handle)
    except Exception as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None


def _check_manifest(path: str) -> None:
    """A ``.csv``/``.parquet`` manifest must have a ``path`` column; say so before any work."""
    lower = path.lower()
    try:
        if lower.endswith(".csv"):
            with _open_text(path) as f:
                header = next(csv.reader(f), [])
            columns = header
        elif lower.endswith(".parquet"):
            with _open_binary(path) as f:
                columns = _parquet_file(path, f).schema_arrow.names
        else:
            with _open_text(path) as f:
                f.read(1)
            return
    except UnicodeDecodeError:
        raise DataError(f"{path}: manifest is not UTF-8 text") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read manifest ({e.strerror or e})") from None
    if "path" not in columns:
        shown = ", ".join(columns[:8]) or "none"
        raise DataError(f"{path}: manifest has no 'path' column (columns: {shown}); name the image column 'path'")


def iter_manifest(path: str) -> Iterator[str]:
    """The image paths a manifest lists, streamed; relative ones joined to its folder."""
    lower = path.lower()
    if lower.endswith(".parquet"):
        entries = _iter_parquet_manifest(path)
    elif lower.endswith(".csv"):
        entries = _iter_csv_manifest(path)
    else:
        entries = _iter_txt_manifest(path)
    join = manifest_joiner(path)
    for entry in entries:
        if entry:
            yield join(entry)


def manifest_joiner(manifest: str):
    """A function giving an entry of ``manifest`` as a path usable from here:
    URIs and absolute paths unchanged, relative ones under the manifest's folder."""
    if is_uri(manifest):
        base = manifest.rsplit("/", 1)[0]

        def join(entry: str) -> str:
            return entry if is_uri(entry) or entry.startswith("/") else posixpath.join(base, entry)

        return join
    base = os.path.dirname(manifest)

    def join_local(entry: str) -> str:
        return entry if is_uri(entry) or os.path.isabs(entry) else str(Path(base, entry))

    return join_local


def _iter_txt_manifest(path: str) -> Iterator[str]:
    with _open_text(path) as f:
        for line in f:
            entry = line.strip()
            if entry and not entry.startswith("#"):
                yield entry


def _iter_csv_manifest(path: str) -> Iterator[str]:
    with _open_text(path) as f:
        for row in csv.DictReader(f):
            yield (row.get("path") or "").strip()


def _iter_parquet_manifest(path: str) -> Iterator[str]:
    with _open_binary(path) as f:
        for batch in _parquet_file(path, f).iter_batches(batch_size=16_384, columns=["path"]):
            for entry in batch.column(0).to_pylist():
                if entry:
                    yield entry.strip()


# --- reading one image ---


def read_image_bytes(path: str) -> bytes:
    """The bytes of one image, local or a URI; an unreadable one is an
    :class:`ImageDecodeError` naming it (so it becomes an error row, not a crash)."""
    try:
        if is_uri(path):
            fs, bare = filesystem(path)
            with fs.open(bare, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except MissingDependencyError as e:
        raise ImageDecodeError(str(e)) from None
    except OSError as e:
        raise ImageDecodeError(f"{path}: cannot read file ({e.strerror or e})") from None
    except Exception as e:  # a remote filesystem's own error types
        raise ImageDecodeError(f"{path}: cannot read file ({type(e).__name__}: {e})") from None
