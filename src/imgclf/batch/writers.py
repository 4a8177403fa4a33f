"""Results on disk: a folder of parts, each a complete file, written as rows come.

``--out results.parquet`` (or ``.csv``, ``.jsonl``) names a folder, as Spark's and
Ray's writers do, holding ``part-000001.parquet``, ``part-000002.parquet``, ...
A part is written under a hidden name and renamed into place once complete
(fsynced), every ``commit_every`` seconds or ``rows_per_part`` rows, so the
folder only ever holds whole, readable parts: a crash loses at most the part in
progress, and every reader of a Parquet dataset (pandas, pyarrow, DuckDB, Spark,
Polars) reads the folder as one table. Files starting with ``_`` or ``.`` are
skipped by those readers: ``_imgclf.json`` records the model's SHA-256, labels
and top-k (CSV and JSON Lines have no other place for them; Parquet parts carry
the same in their key-value metadata), ``_imgclf.lock`` keeps a second run out.

Resuming: the paths already in committed parts are read back (16-byte digests in
a sorted array, 16 bytes a row) and skipped, so re-running the same command after
a crash or Ctrl-C scores only what is missing.

Finished: only a run that scored every input writes ``_SUCCESS`` (as Spark and Hadoop
do) and the row counts into ``_imgclf.json``; a run that starts (or resumes) removes
them first. A folder without ``_SUCCESS`` is a job in progress or one that was stopped.

Object stores (``--out s3://bucket/results.parquet``, any fsspec URI): a part is written
locally and uploaded whole when committed (an object appears complete or not at all,
so the folder still holds only whole parts); there are no advisory locks, so
``_imgclf.lock`` names the run holding the folder (host, process, time) and is checked
again before each commit: a second run is refused while the first one's process is alive
on the same host or its lock is fresher than :data:`REMOTE_LEASE` seconds; a lock left by a
killed run on this host is taken over at once. Two runs started on different hosts within
the same second can both pass the check: start one writer per results folder.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import posixpath
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from imgclf.batch.results import COLUMNS, ResultBatch, arrow_schema
from imgclf.data.uris import as_local, filesystem, is_remote
from imgclf.errors import DataError, ImgclfError, MissingDependencyError, OptionError
from imgclf.names import from_columns
from imgclf.options import COMMIT_EVERY, install_hint

FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl"}
SIDECAR = "_imgclf.json"
LOCK = "_imgclf.lock"
SUCCESS = "_SUCCESS"
#: Seconds after which another host's lock in an object store counts as abandoned.
REMOTE_LEASE = 600
STAGING_PREFIX = "_staging-"


def output_format(out: str | Path) -> str:
    """``parquet``, ``csv`` or ``jsonl`` from the output's extension."""
    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:
        raise OptionError(
            f"--out {out}: unknown results format '{suffix or 'none'}'; end it in .parquet, .csv or .jsonl"
        )
    return FORMATS[suffix]


def check_output(out: str | Path) -> str:
    """Check ``out`` can take results (before any work); returns its format."""
    fmt = output_format(out)
    if fmt == "parquet":
        _need_pyarrow()
    if is_remote(out):
        return _check_remote_output(str(out), fmt)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OptionError(f"--out {out}: exists and is a file; imgclf writes a folder of parts there, "
                          "so remove it or choose another name")  # fmt: skip
    if out.is_dir() and not (out / SIDECAR).is_file() and any(p.name != LOCK for p in out.iterdir()):
        raise OptionError(f"--out {out}: folder exists and does not hold imgclf results; choose another name")
    parent = out.parent if not out.exists() else out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise OptionError(f"--out {out}: cannot write in {parent} (permission denied)")
    return fmt


def _check_remote_output(out: str, fmt: str) -> str:
    fs, bare = filesystem(out)  # a missing filesystem package is one line naming it
    try:
        names = [posixpath.basename(p) for p in fs.ls(bare, detail=False)] if fs.isdir(bare) else []
        if not names and fs.isfile(bare):
            raise OptionError(f"--out {out}: exists and is a file; imgclf writes a folder of parts there")
    except FileNotFoundError:
        names = []
    except ImgclfError:
        raise
    except Exception as e:  # each filesystem raises its own types (no bucket, no permission, no endpoint)
        raise OptionError(f"--out {out}: cannot list it ({type(e).__name__}: {e})") from None
    if names and SIDECAR not in names and any(n != LOCK for n in names):
        raise OptionError(f"--out {out}: folder exists and does not hold imgclf results; choose another name")
    return fmt


def _need_pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise MissingDependencyError(f"Parquet results need pyarrow: {install_hint('batch')}") from None
    return pyarrow


# --- which paths are done ---


def path_key(path: str) -> bytes:
    """A 16-byte digest of a result's path: what resuming compares."""
    return hashlib.blake2b(path.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class PathSet:
    """Paths already scored, as a sorted array of 16-byte digests (16 bytes a path)."""

    def __init__(self, keys: Iterable[bytes] = ()):
        self._keys = np.unique(np.array(list(keys), dtype="S16"))

    @classmethod
    def of_paths(cls, paths: Iterable[str]) -> PathSet:
        return cls([path_key(p) for p in paths])

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, path: str) -> bool:
        if not len(self._keys):
            return False
        key = np.array(path_key(path), dtype="S16")
        i = int(np.searchsorted(self._keys, key))
        return i < len(self._keys) and self._keys[i] == key

    def mask(self, paths: list[str]) -> np.ndarray:
        """True for each of ``paths`` already done (vectorised, for Ray batches)."""
        if not len(self._keys) or not paths:
            return np.zeros(len(paths), bool)
        return np.isin(np.array([path_key(p) for p in paths], dtype="S16"), self._keys)


# --- part files, one class per format ---


class _Part:
    """One part being written under a hidden name; ``close`` makes it complete."""

    def __init__(self, tmp: Path, schema):
        self.tmp = tmp
        self.rows = 0
        self.started = time.monotonic()
        self.file = open(tmp, "wb")

    def write(self, batch: ResultBatch) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

    def abandon(self) -> None:
        if not self.file.closed:
            self.file.close()
        self.tmp.unlink(missing_ok=True)


class _ParquetPart(_Part):
    row_group_rows = 8192

    def __init__(self, tmp: Path, schema):
        import pyarrow.parquet as pq

        super().__init__(tmp, schema)
        self.schema = schema
        self.writer = pq.ParquetWriter(self.file, schema)
        self.pending: list[ResultBatch] = []
        self.pending_rows = 0

    def write(self, batch: ResultBatch) -> None:
        self.pending.append(batch)
        self.pending_rows += len(batch)
        self.rows += len(batch)
        if self.pending_rows >= self.row_group_rows:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        # taken off the list first: a Ctrl-C here can lose rows (scored again on resume), never repeat them
        pending, self.pending, self.pending_rows = self.pending, [], 0
        if pending:
            table = pa.concat_tables([b.to_arrow(self.schema) for b in pending])
            self.writer.write_table(table, row_group_size=len(table))

    def close(self) -> None:
        self._flush()
        self.writer.close()
        super().close()


def _csv_cell(value):
    if value is None:
        return ""
    if isinstance(value, bool):  # the ``known`` flag, as JSON writes it
        return "true" if value else "false"
    if isinstance(value, list):
        return json.dumps(value)
    if isinstance(value, float):
        return repr(value)
    return value


class _CsvPart(_Part):
    def __init__(self, tmp: Path, schema):
        super().__init__(tmp, schema)
        self.text = open(self.file.fileno(), "w", encoding="utf-8", newline="", closefd=False)
        self.writer = csv.writer(self.text)
        self.writer.writerow(COLUMNS)

    def write(self, batch: ResultBatch) -> None:
        self.writer.writerows([_csv_cell(row[c]) for c in COLUMNS] for row in batch.records())
        self.rows += len(batch)

    def close(self) -> None:
        self.text.flush()
        self.text.close()
        super().close()


class _JsonlPart(_Part):
    def write(self, batch: ResultBatch) -> None:
        self.file.write("".join(json.dumps(row) + "\n" for row in batch.records()).encode())
        self.rows += len(batch)


PART_WRITERS = {"parquet": _ParquetPart, "csv": _CsvPart, "jsonl": _JsonlPart}


def read_part_paths(part: Path, fmt: str) -> Iterator[str]:
    """The exact paths of one committed part (from ``path``, and ``path_bytes`` where a name is not UTF-8)."""
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(part, columns=["path", "path_bytes"])
            for path, raw in zip(table.column("path").to_pylist(), table.column("path_bytes").to_pylist()):
                yield from_columns(path, raw)
        elif fmt == "csv":
            with open(part, encoding="utf-8", newline="") as f:
                for row in csv.DictReader(f):
                    yield from_columns(row["path"], row.get("path_bytes") or None)
        else:
            with open(part, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        row = json.loads(line)
                        yield from_columns(row["path"], row.get("path_bytes"))
    except Exception as e:
        raise DataError(f"{part}: results part is unreadable ({type(e).__name__}: {e}); delete it and run again "
                        "to score its images again") from None  # fmt: skip


def count_rows(part: Path, fmt: str) -> tuple[int, int]:
    """Rows and error rows in one committed part."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        errors = pq.read_table(part, columns=["error"]).column("error")
        return len(errors), len(errors) - errors.null_count
    if fmt == "csv":
        with open(part, encoding="utf-8", newline="") as f:
            rows = [bool(row.get("error")) for row in csv.DictReader(f)]
    else:
        with open(part, encoding="utf-8") as f:
            rows = [bool(json.loads(line).get("error")) for line in f if line.strip()]
    return len(rows), sum(rows)


# --- the output folder ---


class ResultFolder:
    """The results folder of one run: checks it, locks it, knows what is done,
    writes parts. Use as a context manager; leaving it commits the part in progress
    (also on Ctrl-C), so every row scored so far is kept."""

    def __init__(
        self, path: str | Path, metadata: dict, *, commit_every: float = COMMIT_EVERY, rows_per_part: int = 100_000
    ):
        self.path = Path(path)
        self.metadata = metadata
        self.commit_every = commit_every
        self.rows_per_part = rows_per_part
        self.format = output_format(self.path)
        self.suffix = self.path.suffix.lower()
        self.done = PathSet()
        self.rows_written = 0
        self._part: _Part | None = None
        self._lock_fd: int | None = None
        self._next_index = 1

    # opening

    def __enter__(self) -> ResultFolder:
        check_output(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OptionError(f"--out {self.path}: cannot create the results folder ({e.strerror or e})") from None
        self._lock()
        try:
            self._check_or_write_sidecar()
            (self.path / SUCCESS).unlink(missing_ok=True)  # in progress again until this run finishes
            self._recover_staging()
            parts = self.parts()
            self.done = PathSet.of_paths(p for part in parts for p in read_part_paths(part, self.format))
            indices = [int(p.stem.split("-")[1]) for p in parts if p.stem.startswith("part-") and p.stem[5:].isdigit()]
            self._next_index = max(indices, default=0) + 1
        except BaseException:
            self._unlock()
            raise
        return self

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; one run at a time is the user's business
            return
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OptionError(f"--out {self.path}: another imgclf run is writing there; wait for it "
                              "or choose another --out") from None  # fmt: skip
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def _check_or_write_sidecar(self) -> None:
        sidecar = self.path / SIDECAR
        wanted = {**self.metadata, "file_format": self.format}
        if not sidecar.is_file():
            _write_atomically(sidecar, json.dumps(wanted, indent=2).encode())
            return
        try:
            found = json.loads(sidecar.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{sidecar}: unreadable ({e}); remove the folder or choose another --out") from None
        self._compare_sidecar(found, wanted)
        if "rows" in found:  # finished before: the counts are written again when this run finishes
            found = {k: v for k, v in found.items() if k not in ("rows", "error_rows")}
            _write_atomically(sidecar, json.dumps(found, indent=2).encode())

    def _compare_sidecar(self, found: dict, wanted: dict) -> None:
        if found.get("model_sha256") != wanted["model_sha256"]:
            raise OptionError(f"--out {self.path}: holds results of another model ({found.get('model')}, sha256 "
                              f"{str(found.get('model_sha256'))[:12]}...); choose another --out or delete it")  # fmt: skip
        if found.get("top_k") != wanted["top_k"]:
            raise OptionError(f"--out {self.path}: holds top-{found.get('top_k')} results; run again with "
                              f"--top-k {found.get('top_k')} or choose another --out")  # fmt: skip
        if found.get("format_version") != wanted.get("format_version"):
            raise OptionError(f"--out {self.path}: holds results format {found.get('format_version')}, this imgclf "
                              f"writes {wanted.get('format_version')}; choose another --out")  # fmt: skip
        ran, now = found.get("ran"), wanted.get("ran")
        if ran and now and (ran.get("precision"), ran.get("cpu")) != (now.get("precision"), now.get("cpu")):
            raise OptionError(f"--out {self.path}: was scored at {ran.get('precision')} on a CPU with "
                              f"{ran.get('cpu')}; this run would score at {now.get('precision')} on {now.get('cpu')}, "
                              "and one results folder never mixes answers: resume there, or choose another --out")  # fmt: skip

    def parts(self) -> list[Path]:
        """The committed parts, sorted by name."""
        return sorted(p for p in self.path.glob(f"*{self.suffix}") if p.is_file() and p.name[0] not in "._")

    # writing

    def write(self, batch: ResultBatch) -> None:
        if not len(batch):
            return
        if self._part is None:
            tmp = self._writing_folder() / f".part-{self._next_index:06d}{self.suffix}.inprogress"
            self._part = PART_WRITERS[self.format](tmp, self._schema())
        self._part.write(batch)
        self.rows_written += len(batch)
        if self._part.rows >= self.rows_per_part or time.monotonic() - self._part.started >= self.commit_every:
            self.commit()

    def _writing_folder(self) -> Path:
        """Where a part is written until it is committed."""
        return self.path

    def _counts(self) -> tuple[int, int]:
        """Rows and error rows in the committed parts."""
        rows = failed = 0
        for part in self.parts():
            n, bad = count_rows(part, self.format)
            rows, failed = rows + n, failed + bad
        return rows, failed

    def _schema(self):
        return arrow_schema(self.metadata) if self.format == "parquet" else None

    def commit(self) -> None:
        """Close the part in progress and put it in place (:meth:`_place`): it is now a result."""
        part, self._part = self._part, None
        if part is None:
            return
        try:
            part.close()
            self._place(part.tmp, f"part-{self._next_index:06d}{self.suffix}")
        except BaseException:
            part.abandon()
            raise
        self._next_index += 1

    def _place(self, tmp: Path, name: str) -> None:
        """A complete part into the folder: renamed into place, the folder synced."""
        os.replace(tmp, self.path / name)
        _fsync_folder(self.path)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.commit()
        finally:
            self._unlock()

    def finish(self) -> None:
        """Every input is scored: write the row counts into the sidecar, then ``_SUCCESS``."""
        self.commit()
        rows, failed = self._counts()
        sidecar = self.path / SIDECAR
        found = json.loads(sidecar.read_text())
        _write_atomically(sidecar, json.dumps({**found, "rows": rows, "error_rows": failed}, indent=2).encode())
        _write_atomically(self.path / SUCCESS, b"")

    # Ray writes with its own writer into a staging folder; finished files move in

    def staging_folder(self) -> Path:
        """A fresh folder for an engine's own writer (``_``-prefixed, so readers skip it)."""
        folder = self.path / f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
        folder.mkdir()
        return folder

    def adopt(self, staging: Path) -> list[Path]:
        """Move the complete files of a staging folder in as parts; returns them."""
        moved = []
        suffixes = {self.suffix, ".json"} if self.format == "jsonl" else {self.suffix}  # Ray writes JSON Lines as .json
        for f in sorted(staging.rglob("*")):
            if f.is_file() and f.suffix.lower() in suffixes and f.name[0] not in "._" and self._complete(f):
                target = self.path / (f.stem + self.suffix)
                os.replace(f, target)
                moved.append(target)
        shutil.rmtree(staging, ignore_errors=True)
        _fsync_folder(self.path)
        return moved

    def _complete(self, f: Path) -> bool:
        if self.format != "parquet":
            return True  # only called after the writer returned
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(f).metadata is not None  # the footer is written last: a cut file has none
        except Exception:
            return False

    def _recover_staging(self) -> None:
        """A crashed engine's staging folders: keep its whole Parquet files, drop the rest."""
        for f in self.path.glob(".part-*.inprogress"):
            f.unlink(missing_ok=True)
        for staging in self.path.glob(f"{STAGING_PREFIX}*"):
            if staging.is_dir():
                if self.format == "parquet":
                    self.adopt(staging)
                else:
                    shutil.rmtree(staging, ignore_errors=True)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def open_results(path: str | Path, metadata: dict, **options) -> ResultFolder:
    """The results folder at ``path``: on disk, or in an object store for a URI."""
    return (
        RemoteResultFolder(str(path), metadata, **options)
        if is_remote(path)
        else ResultFolder(as_local(path), metadata, **options)
    )


class RemoteResultFolder(ResultFolder):
    """A results folder in an object store (any fsspec URI): parts written locally, uploaded
    whole when committed; the lock is an object naming its run (see the module docstring)."""

    def __init__(self, uri: str, metadata: dict, **options):
        super().__init__(Path(uri.split("://", 1)[1]), metadata, **options)
        self.uri = uri
        self.fs, self.root = filesystem(uri)
        self.format = output_format(uri)
        self.local = Path(tempfile.mkdtemp(prefix="imgclf-results-"))
        self._run = {"host": socket.gethostname(), "pid": os.getpid(), "run": uuid.uuid4().hex}
        self._names: list[str] = []

    def _key(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def _read(self, name: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._key(name))
        except FileNotFoundError:
            return None

    def __enter__(self) -> RemoteResultFolder:
        check_output(self.uri)
        self._lock()
        try:
            raw = self._read(SIDECAR)
            wanted = {**self.metadata, "file_format": self.format}
            if raw is None:
                self.fs.pipe_file(self._key(SIDECAR), json.dumps(wanted, indent=2).encode())
            else:
                found = json.loads(raw)
                self._compare_sidecar(found, wanted)
                if "rows" in found:
                    found = {k: v for k, v in found.items() if k not in ("rows", "error_rows")}
                    self.fs.pipe_file(self._key(SIDECAR), json.dumps(found, indent=2).encode())
            if self._read(SUCCESS) is not None:
                self.fs.rm_file(self._key(SUCCESS))
            paths = []
            for name in self._part_names():
                paths.extend(read_part_paths(self._download(name), self.format))
            self.done = PathSet.of_paths(paths)
            indices = [int(n.split(".")[0].split("-")[1]) for n in self._part_names()
                       if n.startswith("part-") and n.split(".")[0][5:].isdigit()]  # fmt: skip
            self._next_index = max(indices, default=0) + 1
        except BaseException:
            self._unlock()
            raise
        return self

    def _part_names(self) -> list[str]:
        self.fs.invalidate_cache(self.root)
        try:
            names = [posixpath.basename(p) for p in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.endswith(self.suffix) and n[0] not in "._")

    def _download(self, name: str) -> Path:
        local = self.local / f"_read-{name}"
        local.write_bytes(self.fs.cat_file(self._key(name)))
        return local

    def parts(self) -> list[Path]:
        return [self._download(n) for n in self._part_names()]

    def _lock(self) -> None:
        held = self._read(LOCK)
        if held is not None:
            try:
                other = json.loads(held)
            except ValueError:
                other = {}
            if other.get("run") != self._run["run"] and not _abandoned(other):
                raise OptionError(f"--out {self.uri}: another imgclf run is writing there ({other.get('host')}, "
                                  f"process {other.get('pid')}); wait for it, choose another --out, or delete "
                                  f"{self.uri}/{LOCK} if that run is gone")  # fmt: skip
        self._refresh_lock()
        if json.loads(self._read(LOCK) or b"{}").get("run") != self._run["run"]:
            raise OptionError(f"--out {self.uri}: another imgclf run took the folder at the same moment; "
                              "choose another --out")  # fmt: skip
        self._lock_fd = 1

    def _refresh_lock(self) -> None:
        self.fs.pipe_file(self._key(LOCK), json.dumps({**self._run, "time": time.time()}).encode())

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            try:
                if json.loads(self._read(LOCK) or b"{}").get("run") == self._run["run"]:
                    self.fs.rm_file(self._key(LOCK))
            finally:
                self._lock_fd = None
                shutil.rmtree(self.local, ignore_errors=True)

    def _writing_folder(self) -> Path:
        return self.local  # written here, uploaded whole when committed

    def _place(self, tmp: Path, name: str) -> None:
        """Upload a complete part whole (only then does it appear in the store), if the lock is still ours."""
        if json.loads(self._read(LOCK) or b"{}").get("run") != self._run["run"]:
            raise OptionError(f"--out {self.uri}: another run took the folder over; this run's last part "
                              "is not written")  # fmt: skip
        self.fs.put_file(str(tmp), self._key(name))
        self._refresh_lock()
        tmp.unlink(missing_ok=True)

    def finish(self) -> None:
        self.commit()
        rows, failed = self._counts()
        found = json.loads(self._read(SIDECAR))
        self.fs.pipe_file(
            self._key(SIDECAR), json.dumps({**found, "rows": rows, "error_rows": failed}, indent=2).encode()
        )
        self.fs.pipe_file(self._key(SUCCESS), b"")

    def staging_folder(self) -> Path:
        raise OptionError(f"--out {self.uri}: --engine ray writes to a local or shared folder, not an object store; "
                          "score to a folder and copy it, or use the local engine")  # fmt: skip


def _abandoned(lock: dict) -> bool:
    """A lock left by a run that is gone: this host's process no longer runs, or another
    host's lock older than the lease."""
    if lock.get("host") == socket.gethostname():
        try:
            os.kill(int(lock.get("pid", -1)), 0)
        except (ProcessLookupError, ValueError):
            return True
        except PermissionError:
            return False
        return False
    return time.time() - float(lock.get("time", 0)) > REMOTE_LEASE
