"""Manifests: tables that list images, read one way for training, evaluation, the audit and scoring.

A manifest is a ``.csv``, ``.tsv``, ``.jsonl`` or ``.parquet`` table with a path column (and, to
learn or measure, a label column), or a ``.txt`` with one path per line. It may sit on disk or
behind a URI (fsspec), and its entries are absolute paths, URIs, or paths relative to the
manifest's own folder, so a manifest can travel with its images (Hugging Face's imagefolder
``metadata.csv`` is one). Scoring streams the path column (``iter_manifest``); training and
evaluation read path, label and split columns (``imgclf.data.layouts``). One reader, so a
manifest that scores also trains, and a bad one is the same one line everywhere, naming the
file and the line or column.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from imgclf.data.images import embedded_image
from imgclf.data.uris import filesystem, is_uri
from imgclf.errors import DataError, MissingDependencyError
from imgclf.options import PATH_COLUMNS, install_hint

#: Tables with named columns, and every manifest suffix (a ``.txt`` lists paths alone).
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")
MANIFEST_SUFFIXES = (".txt", *TABLE_SUFFIXES)
#: The column that puts a row in the train, validation or test part.
SPLIT_COLUMN = "split"


def is_manifest(path: str | Path) -> bool:
    """Whether ``path`` is named as a manifest (by its suffix)."""
    return str(path).lower().endswith(MANIFEST_SUFFIXES)


def is_table(path: str | Path) -> bool:
    """Whether ``path`` is named as a manifest with columns (not a ``.txt`` list)."""
    return str(path).lower().endswith(TABLE_SUFFIXES)


def _open_text(path: str):
    if is_uri(path):
        fs, bare = filesystem(path)
        return io.TextIOWrapper(fs.open(bare, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")  # -sig: a spreadsheet's byte-order mark is no column name


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


class _Reading:
    """A context turning what reading the manifest ``path`` can raise into one :class:`DataError` naming it."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb) -> bool:
        if error is None or isinstance(error, (DataError, MissingDependencyError)):
            return False
        if isinstance(error, UnicodeDecodeError):
            raise DataError(f"{self.path}: manifest is not UTF-8 text; save it as UTF-8") from None
        if isinstance(error, FileNotFoundError):
            raise DataError(f"{self.path}: no such manifest") from None
        if isinstance(error, OSError):
            raise DataError(f"{self.path}: cannot read manifest ({error.strerror or error})") from None
        if isinstance(error, csv.Error):
            raise DataError(f"{self.path}: not a readable table ({error}); save it as plain CSV") from None
        if isinstance(error, Exception):  # a remote filesystem's own errors
            raise DataError(f"{self.path}: cannot read manifest ({type(error).__name__}: {error})") from None
        return False


def _delimiter(path: str) -> str:
    return "\t" if path.lower().endswith(".tsv") else ","


def columns_of(path: str) -> list[str]:
    """The manifest's column names: a CSV's or TSV's header, a JSON Lines file's first object's
    keys, a Parquet file's schema; ``[]`` for a ``.txt`` list. A missing, empty or unreadable
    manifest is one :class:`DataError` naming it."""
    lower = path.lower()
    with _Reading(path):
        if lower.endswith(".parquet"):
            with _open_binary(path) as f:
                return list(_parquet_file(path, f).schema_arrow.names)
        with _open_text(path) as f:
            if lower.endswith(".jsonl"):
                for number, line in enumerate(f, 1):
                    if line.strip():
                        return list(_json_object(path, number, line))
                raise DataError(f"{path}: manifest is empty; give one JSON object per line, with a path column")
            if lower.endswith((".csv", ".tsv")):
                header = next(csv.reader(f, delimiter=_delimiter(path)), None)
                if not header or not any(h.strip() for h in header):
                    raise DataError(f"{path}: manifest is empty; its first line names the columns (path,label)")
                names = [h.strip() for h in header]
                twice = next((n for i, n in enumerate(names) if n and n in names[:i]), None)
                if twice is not None:  # a row would keep the last of them alone, silently
                    raise DataError(f"{path}: its header names column '{twice}' twice; rename or remove one")
                return names
            f.read(1)
            return []


def _json_object(path: str, number: int, line: str) -> dict:
    try:
        value = json.loads(line)
    except ValueError as e:
        raise DataError(f"{path} line {number}: not JSON ({e}); give one JSON object per line") from None
    if not isinstance(value, dict):
        raise DataError(f"{path} line {number}: a JSON {type(value).__name__}, not an object; give one "
                        "{\"path\": ..., \"label\": ...} object per line")  # fmt: skip
    return value


def find_column(path: str, columns: Sequence[str], given: str | None, names: Sequence[str], what: str,
                flag: str) -> str | None:  # fmt: skip
    """The column named ``given`` (exactly), else the first of ``names`` among ``columns`` (any
    case), else None; a ``given`` column the manifest lacks is one :class:`DataError`."""
    if given is not None:
        if given not in columns:
            raise DataError(f"{path}: no column '{given}' ({flag}); its columns: {_shown(columns)}")
        return given
    lowered = {c.lower(): c for c in reversed(columns)}  # the first of two spellings wins
    return next((lowered[n] for n in names if n in lowered), None)


def _shown(columns: Sequence[str]) -> str:
    return ", ".join(columns[:10]) + (", ..." if len(columns) > 10 else "") if columns else "none"


def path_column(path: str, given: str | None = None) -> str | None:
    """The column of image paths of a table manifest (None for a ``.txt`` list); a table
    without one is one :class:`DataError` naming its columns and what to call it."""
    if not is_table(path):
        columns_of(path)  # readable, and UTF-8
        return None
    columns = columns_of(path)
    found = find_column(path, columns, given, PATH_COLUMNS, "path", "--path-column")
    if found is None:
        raise DataError(f"{path}: manifest has no 'path' column (nor {', '.join(PATH_COLUMNS[1:])}; its columns: "
                        f"{_shown(columns)}); name the image column 'path', or give --path-column")  # fmt: skip
    return found


def iter_rows(path: str, wanted: Sequence[str]) -> Iterator[tuple[str, list]]:
    """(where, values) for each row of a table manifest: ``where`` names the row as a person finds
    it (``data.csv line 7``, ``data.parquet row 3``); ``values`` holds the ``wanted`` columns."""
    lower = path.lower()
    with _Reading(path):
        if lower.endswith(".parquet"):
            with _open_binary(path) as f:
                number = 0
                for batch in _parquet_file(path, f).iter_batches(batch_size=16_384, columns=list(wanted)):
                    columns = [batch.column(name).to_pylist() for name in wanted]
                    for values in zip(*columns):
                        number += 1
                        yield f"{path} row {number}", list(values)
            return
        with _open_text(path) as f:
            if lower.endswith(".jsonl"):
                for number, line in enumerate(f, 1):
                    if line.strip():
                        row = _json_object(path, number, line)
                        yield f"{path} line {number}", [row.get(name) for name in wanted]
                return
            reader = csv.DictReader(f, delimiter=_delimiter(path))
            reader.fieldnames = [h.strip() for h in reader.fieldnames or []]
            row = None
            for row in reader:
                values = [row.get(name) for name in wanted]
                if any(_broken(v) for v in values):
                    raise DataError(_runs_over_lines(path, reader.line_num, row, [*wanted, *row]))
                yield f"{path} line {reader.line_num}", values
            if row is not None and any(_broken(v) and v.endswith(("\n", "\r")) for v in row.values()):
                raise DataError(_runs_over_lines(path, reader.line_num, row, list(row)))  # a quote open to the end


def _broken(cell: object) -> bool:
    return isinstance(cell, str) and ("\n" in cell or "\r" in cell)


def _runs_over_lines(path: str, last_line: int, row: dict, columns: list) -> str:
    """Why a row is refused whose path, label or split cell holds a line break, or whose last
    cell runs to the end of the file: a quote left open, which makes the csv reader take the
    following lines as one cell."""
    text = [v for v in row.values() if isinstance(v, str)] + [x for x in row.get(None) or [] if isinstance(x, str)]
    first = last_line - sum(v.rstrip("\r\n").count("\n") for v in text)  # an open quote takes the last newline too
    column = next(name for name in columns if _broken(row.get(name)))
    return (f"{path} line {first}: column '{column}' runs over {last_line - first + 1} lines, to line {last_line} "
            "(a quote left open?); close the quote or remove the line break")


def manifest_joiner(manifest: str) -> Callable[[str], str]:
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


def iter_manifest(path: str, column: str | None = None, *, join: bool = True) -> Iterator[str]:
    """The image paths a manifest lists, streamed, relative ones joined to its folder (as written
    when not ``join``); blank entries (and a ``.txt``'s ``#`` comments) skipped. ``column``: the
    path column (detected when None)."""
    joiner = manifest_joiner(path) if join else str
    if not is_table(path):
        with _Reading(path), _open_text(path) as f:
            for line in f:
                entry = line.strip()
                if entry and not entry.startswith("#"):
                    yield joiner(entry)
        return
    column = column or path_column(path)
    for where, (entry,) in iter_rows(path, [column]):
        embedded = embedded_image(entry)
        if embedded is not None and embedded[0] is None and embedded[1]:
            entry = embedded[1]  # Hugging Face datasets' image that was not embedded: its path
        if isinstance(entry, (dict, bytes, bytearray)):  # Hugging Face datasets' {"bytes", "path"} images
            raise DataError(f"{where}: column '{column}' holds the images themselves, not paths; a results "
                            "folder is resumed by path: score them from Python (model.predict_batch on the "
                            "table read with pandas), or write the images out as files")  # fmt: skip
        entry = "" if entry is None else str(entry).strip()
        if entry:
            yield joiner(entry)
