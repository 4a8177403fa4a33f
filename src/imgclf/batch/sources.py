"""Where the images to score come from: files, folders, globs, manifests, URIs.

An INPUT is one of:

- an image file (always scored, whatever its extension);
- a folder, walked recursively in sorted order (files with an image extension);
- a glob (``photos/**/*.jpg``), its matches sorted; folders it matches are walked;
- a manifest: a ``.txt`` with one path per line (blank lines and ``#`` comments
  skipped), or a ``.csv`` / ``.tsv`` / ``.jsonl`` / ``.parquet`` with a path column,
  read by :mod:`imgclf.data.manifests` as training reads it. Manifests are streamed,
  never listed into memory. Relative entries are taken relative to the manifest's own
  folder, so a manifest can travel with its images;
- any of these as a URI (``s3://``, ``gs://``, ...), read through fsspec when the
  matching filesystem package is installed.

Paths come out as strings, in the same order and spelling as ``imgclf predict``
prints them for local files and folders.
"""

from __future__ import annotations

import glob
import os
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from imgclf.data.images import IMAGE_EXTENSIONS, is_skipped, iter_image_files
from imgclf.data.manifests import MANIFEST_SUFFIXES, iter_manifest, manifest_joiner, path_column  # noqa: F401
from imgclf.data.uris import filesystem, is_uri, read_image_bytes  # noqa: F401  (re-exported: where they used to live)
from imgclf.errors import DataError

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
        try:
            if GLOB_CHARS & set(path):
                if not fs.glob(path):
                    raise DataError(f"{text}: matches no files")
                return "glob"
            if fs.isdir(path):
                return "folder"
            exists = fs.isfile(path)
        except DataError:
            raise
        except Exception as e:  # any filesystem's own error: permissions, credentials, network
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
            yield from iter_image_files(str(Path(item.text)))
        else:
            for match in sorted(glob.glob(item.text, recursive=True)):
                if os.path.isdir(match):
                    yield from iter_image_files(str(Path(match)))
                elif _has_image_suffix(match):
                    yield str(Path(match))


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
        if is_skipped(posixpath.basename(name)):
            continue
        uri = f"{spelled}/{posixpath.basename(name)}"
        if entry["type"] == "directory":
            yield from _walk_fs(fs, name, uri)
        elif _has_image_suffix(name):
            yield uri


# --- manifests (read by imgclf.data.manifests, as training reads them) ---


def _check_manifest(path: str) -> None:
    """A table manifest must have a path column (``path``, ``file_name``, ...); say so before any work."""
    path_column(path)
