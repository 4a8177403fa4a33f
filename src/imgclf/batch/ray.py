"""Scoring on a Ray cluster (or all of this machine) with Ray Data.

Ray Data reads the bytes (``read_binary_files`` for files, folders and globs;
the manifest's own reader, then a read step, for manifests); a pool of actors,
each holding the model once (loaded by :func:`load_scoring_model`, with ONNX
Runtime's threads set to the actor's CPUs), decodes, preprocesses and scores
batches; Ray's Parquet (or CSV, JSON) writer writes the results. Only this module
imports Ray: ``pip install 'imgclf[ray]'``.

Python: :func:`predict_dataset` takes a Ray Dataset with a ``bytes`` column (as
``ray.data.read_binary_files(..., include_paths=True)`` makes) or a ``path``
column, and returns a Dataset of result rows, to chain into your own pipeline.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from imgclf.batch.local import ScoringSummary, check_options
from imgclf.batch.results import arrow_schema
from imgclf.batch.scoring import ModelFile, load_scoring_model, score_sources
from imgclf.batch.sources import Input, classify_inputs, is_uri, iter_image_paths, manifest_joiner, read_image_bytes
from imgclf.batch.writers import PathSet, ResultFolder, check_output, count_rows, open_results
from imgclf.data.manifests import iter_manifest, path_column
from imgclf.data.uris import is_remote
from imgclf.errors import DataError, ImageDecodeError, ImgclfError, MissingDependencyError, OptionError
from imgclf.names import from_columns, is_text, printable, raw_hex
from imgclf.options import SCORING_BATCH_SIZE, TOP_K, install_hint, option_error

#: Reading files and writing results wait on storage, not CPUs: they reserve none, so a
#: pool of actors holding every CPU cannot starve them (and deadlock the pipeline).
IO_TASK = {"num_cpus": 0}
#: Rows per results file Ray writes: a crash loses at most this many rows per writer.
ROWS_PER_FILE = 10_000


def _tasks(ray, size: int):
    """At most ``size`` Ray tasks at once for a ``map_batches`` step: ``compute=``, which Ray 2.51
    and later want where ``concurrency=`` was (Ray Data's ``get_compute_strategy`` warns on it);
    the read and write steps still take ``concurrency=``, without a warning."""
    return ray.data.TaskPoolStrategy(size=size)


def io_tasks(workers: int) -> int:
    """Readers and writers running at once: reading a file costs about 1% of scoring it,
    so one per 4 actors keeps them fed, without a Ray worker process each to start."""
    return max(1, workers // 4)


def _check_ray_options(workers: int | tuple[int, int] | None, **values) -> None:
    """The options of scoring on Ray, checked as ``imgclf predict``'s; ``workers`` may also be
    a ``(min, max)`` pool."""
    sizes = workers if isinstance(workers, tuple) else (workers, workers)
    for size in sizes:
        check_options(workers=size, **values)
    if sizes[0] is not None and sizes[1] < sizes[0]:
        raise option_error("workers", "{workers} (min, max) must have min <= max, got {given}", given=workers)


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise MissingDependencyError(f"--engine ray needs Ray Data: {install_hint('ray')}") from None
    return ray


class _ImageScorer:
    """One actor: the model loaded once; each call scores a batch of images."""

    def __init__(
        self, model: list, top_k: int, device: str, threads: int, metadata: dict | None, precision: str = "auto"
    ):
        import ray

        # ``model`` is [ObjectRef of the ModelFile]: the bytes sit once in the object store
        self.predictor = ray.get(model[0]).load(device, threads, "auto", precision)
        self.top_k = top_k
        self.threads = threads
        self.schema = arrow_schema(metadata)

    def __call__(self, batch):
        names = batch.column_names
        if "bytes" not in names and "path" not in names:
            raise DataError(f"predict_dataset needs a 'bytes' or a 'path' column; the dataset has {', '.join(names)}")
        named = "path" in names
        paths = batch.column("path").to_pylist() if named else ["<image>"] * batch.num_rows
        if "path_bytes" in names:  # names that are not UTF-8 travel as text plus their raw bytes
            paths = [from_columns(p, b) for p, b in zip(paths, batch.column("path_bytes").to_pylist())]
        sources = batch.column("bytes").to_pylist() if "bytes" in names else list(paths)
        if "read_error" in names:
            for i, error in enumerate(batch.column("read_error").to_pylist()):
                if error:
                    sources[i] = ImageDecodeError(error)
        result = score_sources(self.predictor, paths, sources, self.top_k, workers=self.threads)
        if not named:
            for row in result.rows:  # images given as bytes alone have no name to write
                row["file"] = None
        return result.to_arrow(self.schema)


def predict_dataset(
    model,
    dataset,
    *,
    top_k: int = TOP_K,
    batch_size: int = SCORING_BATCH_SIZE,
    workers: int | tuple[int, int] | None = None,
    cpus_per_worker: float = 1,
    gpus_per_worker: float = 0,
    metadata: dict | None = None,
    precision: str = "auto",
):
    """A Ray Dataset of result rows for a Ray Dataset of images.

    ``model``: a model file path (``.onnx``, or ``.imgclf`` for a GPU) or a
    :class:`ModelFile`; its bytes travel to the actors, so no shared storage is needed.
    ``dataset``: rows with ``bytes`` (and ``path`` to name them), or with ``path``
    only (read by the actors; local paths or fsspec URIs).
    ``workers``: actors in the pool: a number, or ``(min, max)`` for a pool Ray Data
    grows while upstream steps keep their share of the cluster. Default: ``(1, the
    cluster's CPUs / cpus_per_worker)`` (or GPUs / ``gpus_per_worker``). A fixed pool
    that holds every CPU leaves none for upstream steps that need one (Ray's readers
    reserve a CPU each by default), and the pipeline then waits forever. Each actor
    gets ``cpus_per_worker`` CPUs, which set its engine's and decoding threads; each
    picks its inference engine as ``imgclf.nets.engines.choose_engine`` says, at
    ``precision``. Lazy, like every Ray Dataset.
    """
    ray = _ray()
    _check_ray_options(top_k=top_k, batch_size=batch_size, workers=workers, cpus_per_worker=cpus_per_worker,
                       gpus_per_worker=gpus_per_worker, precision=precision)  # fmt: skip
    model_file = model if isinstance(model, ModelFile) else ModelFile.read(model)
    if gpus_per_worker and model_file.name.lower().endswith(".onnx"):
        raise option_error("gpus_per_worker", "{gpus_per_worker} needs an .imgclf model: the exported ONNX model "
                                              "runs on CPUs")  # fmt: skip
    if workers is None:
        workers = (1, _max_workers(ray, cpus_per_worker, gpus_per_worker))
    sizes = workers if isinstance(workers, tuple) else (workers, workers)
    pool = ray.data.ActorPoolStrategy(size=sizes[0]) if sizes[0] == sizes[1] else ray.data.ActorPoolStrategy(
        min_size=sizes[0], max_size=sizes[1])  # fmt: skip
    threads = max(1, int(cpus_per_worker))
    return dataset.map_batches(
        _ImageScorer,
        fn_constructor_kwargs={
            "model": [ray.put(model_file)],
            "top_k": top_k,
            "device": "cuda" if gpus_per_worker else "cpu",
            "threads": threads,
            "metadata": metadata,
            "precision": precision,
        },
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=pool,
        num_cpus=cpus_per_worker,
        num_gpus=gpus_per_worker or None,
    )


def _max_workers(ray, cpus_per_worker: float, gpus_per_worker: float) -> int:
    """As many actors as the cluster's CPUs (or GPUs) hold."""
    if not ray.is_initialized():
        ray.init()
    resources = ray.cluster_resources()
    if gpus_per_worker:
        workers = int(resources.get("GPU", 0) // gpus_per_worker)
    else:
        workers = int(resources.get("CPU", 1) // cpus_per_worker)
    if workers < 1:
        raise OptionError(f"the Ray cluster has too few resources for one worker ({resources.get('CPU', 0)} CPUs, "
                          f"{resources.get('GPU', 0)} GPUs)")  # fmt: skip
    return workers


# --- the CLI's run: inputs in, a results folder out ---


def _with_read_error(batch):
    import pyarrow as pa

    batch = batch.append_column("read_error", pa.nulls(batch.num_rows, pa.string()))
    return batch.append_column("path_bytes", pa.nulls(batch.num_rows, pa.string()))


def _read_listed(batch, join, done: PathSet, column: str = "path"):
    """A manifest's rows: paths joined to its folder, those done dropped, bytes read.

    ``column``: the manifest's path column (renamed ``path`` here). A ``.txt`` manifest
    arrives as ``text`` lines: blank ones and ``#`` comments are dropped.
    One step, and no CPU reserved, so the actor pool can hold every CPU without
    starving the manifest's side of the pipeline.
    """
    import pyarrow as pa

    column = column if column in batch.column_names else "text"
    entries = ["" if e is None else str(e).strip() for e in batch.column(column).to_pylist()]
    if "path_bytes" in batch.column_names:  # listed names that are not UTF-8 (see _listed_dataset)
        entries = [from_columns(e, b) for e, b in zip(entries, batch.column("path_bytes").to_pylist())]
    paths = [join(e) for e in entries if e and not (column == "text" and e.startswith("#"))]
    keep = ~done.mask(paths)
    paths = [p for p, k in zip(paths, keep) if k]
    data, errors = [], []
    for path in paths:
        try:
            data.append(read_image_bytes(path))
            errors.append(None)
        except ImageDecodeError as e:
            data.append(None)
            errors.append(str(e))
    return pa.table({"path": pa.array([printable(p) for p in paths], pa.string()), "bytes": pa.array(data, pa.binary()),
                     "read_error": pa.array(errors, pa.string()),
                     "path_bytes": pa.array([raw_hex(p) for p in paths], pa.string())})  # fmt: skip


def _manifest_dataset(ray, manifest: str, done: PathSet, readers: int):
    lower = manifest.lower()
    column = path_column(manifest) or "text"  # as imgclf.data.manifests reads it: path, file_name, ...
    if lower.endswith(".parquet"):
        listed = ray.data.read_parquet(manifest, columns=[column], concurrency=readers, **IO_TASK)
    elif lower.endswith(".csv"):
        import pyarrow.csv as pacsv

        listed = ray.data.read_csv(manifest, convert_options=pacsv.ConvertOptions(
            include_columns=[column], column_types={column: "string"}), concurrency=readers, **IO_TASK)  # fmt: skip
    elif lower.endswith((".tsv", ".jsonl")):  # read by imgclf's own reader, the paths then spread over tasks
        listed = ray.data.from_items([{column: entry} for entry in iter_manifest(manifest, column, join=False)])
    else:
        listed = ray.data.read_text(manifest, concurrency=readers, **IO_TASK)
    return listed.map_batches(
        _read_listed, fn_kwargs={"join": manifest_joiner(manifest), "done": done, "column": column},
        batch_format="pyarrow", compute=_tasks(ray, readers), **IO_TASK)  # fmt: skip


def _ray_reads(path: str) -> bool:
    """Whether Ray's ``read_binary_files`` reads ``path`` as it is: a local file whose name is
    UTF-8 and printable, without spaces at its ends."""
    return not is_uri(path) and is_text(path) and path.isprintable() and path == path.strip() and os.path.isfile(path)


def _listed_dataset(ray, paths: list[str], readers: int):
    """Files found by listing: local ones through ``read_binary_files``, URIs read by a task."""
    datasets = []
    # Ray's file reader takes UTF-8 names of files it can open, and strips control characters
    # (a tab or carriage return) from them, so such a file was missing and the job died;
    # imgclf reads the rest itself (those names, names that are not UTF-8, links that cannot
    # be followed), so they become rows, not a crash
    by_ray = [_ray_reads(p) for p in paths]  # one look at each file
    local = [p for p, ours in zip(paths, by_ray) if ours]
    remote = [p for p, ours in zip(paths, by_ray) if not ours]
    if local:
        read = ray.data.read_binary_files(local, include_paths=True, concurrency=readers, **IO_TASK)
        datasets.append(read.map_batches(_with_read_error, batch_format="pyarrow", compute=_tasks(ray, readers),
                                         **IO_TASK))  # fmt: skip
    if remote:
        items = ray.data.from_items([{"path": printable(p), "path_bytes": raw_hex(p)} for p in remote])
        datasets.append(items.map_batches(_read_listed, fn_kwargs={"join": str, "done": PathSet()},
                                          batch_format="pyarrow", compute=_tasks(ray, readers), **IO_TASK))  # fmt: skip
    return datasets


def score_with_ray(
    model: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    top_k: int = TOP_K,
    batch_size: int = SCORING_BATCH_SIZE,
    address: str | None = None,
    workers: int | None = None,
    cpus_per_worker: float = 1,
    gpus_per_worker: float = 0,
    progress: bool = True,
    precision: str = "auto",
) -> ScoringSummary:
    """``imgclf predict --engine ray``: score ``inputs`` on a Ray cluster into ``out``.

    Uses the Ray session already started in this process, else connects to
    ``address`` (``auto``, ``ray://host:10001``) or starts Ray on this machine (and
    stops it at the end). Ray's writer writes into a staging folder inside ``out``
    whose complete files move in when it finishes, so ``out`` only ever holds whole
    parts, and a re-run skips what is already there, as the local engine does.
    On a cluster, ``out`` must be on storage the driver and every node see.
    """
    _check_ray_options(top_k=top_k, batch_size=batch_size, workers=workers, cpus_per_worker=cpus_per_worker,
                       gpus_per_worker=gpus_per_worker, precision=precision)  # fmt: skip
    fmt = check_output(out)
    if is_remote(out):
        raise OptionError(f"--out {out}: --engine ray writes to a local or shared folder, not an object store; "
                          "score to a folder and copy it, or use the local engine")  # fmt: skip
    sources = classify_inputs(inputs)
    ray = _ray()
    model_file = ModelFile.read(model)
    local = load_scoring_model(model, precision=precision)  # a bad model or precision fails here
    labels = local.labels  # each worker chooses as this does: the same engine and precision on a machine like this
    metadata = model_file.metadata(labels, top_k, local.engine_choice().to_dict())
    started_here = not ray.is_initialized()
    with _quiet(ray):
        if started_here:
            _init(ray, address)
        try:
            ray.data.DataContext.get_current().enable_progress_bars = progress
            started = time.perf_counter()
            with open_results(out, metadata) as folder:
                summary = _run(ray, folder, fmt, sources, model_file, metadata, top_k=top_k, batch_size=batch_size,
                               workers=workers, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                               precision=precision)  # fmt: skip
                folder.finish()  # every input scored: _SUCCESS and the row counts
            summary.seconds = time.perf_counter() - started
            return summary
        finally:
            if started_here:
                ray.shutdown()


#: Lines Ray's C++ core writes to this process's stderr by itself that are not errors: Ray Data's
#: actor pool passes object references to each actor it starts, and the core worker logs this,
#: at ERROR, for every actor (a false alarm, ray-project/ray#57733, ray-project/ray#57838).
RAY_CORE_NOISE = (
    re.compile(rb"core_worker\.cc:\d+: Actor with class name: '[^']*' and ID: '[0-9a-f]+' has constructor "
               rb"arguments in the object store and max_restarts > 0\."),
)  # fmt: skip


@contextmanager
def filtered_stderr(noise: Sequence[re.Pattern] = RAY_CORE_NOISE) -> Iterator[None]:
    """Leave out of this process's stderr the lines that C or C++ code writes straight to file
    descriptor 2 and match ``noise``; every other line passes, as it comes.

    For the command line, which owns its process: fd 2 becomes a pipe read by a thread, while
    Python's own ``sys.stderr`` writes to the real stderr (so progress bars still see a
    terminal). Where stderr is not fd 2 (a notebook) or pipes cannot be polled, nothing changes.
    """
    import select
    import sys
    import threading

    try:
        if sys.stderr.fileno() != 2 or not hasattr(select, "poll"):
            raise ValueError
    except (AttributeError, ValueError, OSError):
        yield
        return
    sys.stderr.flush()
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    python_stderr = sys.stderr
    sys.stderr = os.fdopen(os.dup(real), "w", buffering=1, encoding=python_stderr.encoding,
                           errors=python_stderr.errors)  # fmt: skip
    done = threading.Event()
    thread = threading.Thread(target=_forward_lines, args=(read_end, real, noise, done), daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real, 2)  # the pipe's write end is gone from this process: the thread drains it and stops
        done.set()
        thread.join(5)
        sys.stderr.close()
        sys.stderr = python_stderr
        os.close(real)


def _forward_lines(read_end: int, out: int, noise: Sequence[re.Pattern], done) -> None:
    """Copy what arrives on ``read_end`` to ``out`` line by line, leaving out the ``noise``
    lines; a partial line is passed on when nothing more comes for a tenth of a second."""
    import select

    poller = select.poll()
    poller.register(read_end, select.POLLIN)
    pending = b""

    def write(data: bytes) -> None:
        try:
            os.write(out, data)
        except OSError:
            pass

    try:
        while True:
            if not poller.poll(100):
                if pending:
                    write(pending)
                    pending = b""
                if done.is_set():
                    break
                continue
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            write(b"".join(line + b"\n" for line in lines if not any(n.search(line) for n in noise)))
        if pending and not any(n.search(pending) for n in noise):
            write(pending)
    finally:
        os.close(read_end)


#: Ray's Python loggers: INFO and WARNING from them are Ray's own chatter in a run of imgclf's.
RAY_LOGGERS = ("ray", "ray.data")


@contextmanager
def _quiet(ray) -> Iterator[None]:
    """Ray's and Ray Data's loggers at ERROR for the run (their INFO lines, progress logged
    as lines where stdout is not a terminal, the token-authentication notice of a Ray started
    here), then as they were. Errors still show; progress bars on a terminal are not logging."""
    loggers = [logging.getLogger(name) for name in RAY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _reachable(address: str, timeout: float = 5.0) -> str | None:
    """Why ``ray://host:port`` cannot be reached, in a few seconds, or None (Ray Client itself
    retries for a minute or more before saying anything)."""
    import socket
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(address)
        host, port = parts.hostname, parts.port or 10001
    except ValueError as e:
        return f"not a ray://HOST:PORT address ({e})"
    if not host:
        return "not a ray://HOST:PORT address"
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"nothing answers at {host}:{port} ({e.strerror or type(e).__name__})"
    return None


def _init(ray, address: str | None) -> None:
    if address and address.startswith("ray://"):
        import importlib.util

        if importlib.util.find_spec("grpc") is None:
            raise MissingDependencyError(f"--address {address}: Ray Client needs grpcio: {install_hint('ray')}")
        why = _reachable(address)
        if why:
            raise option_error("address", "{address} {given}: cannot connect to the Ray cluster: {why}",
                               given=address, why=why)  # fmt: skip
        # Ray Data's streaming executor needs a driver on the cluster: through Ray Client (2.60) its
        # first write fails deep inside Ray ('Worker' object has no attribute 'core_worker').
        raise option_error("address", "{address} {given}: the cluster answers, but Ray Data does not run through "
                           "Ray Client; run imgclf on the cluster: ray job submit --address http://HEAD:8265 -- "
                           "imgclf predict ... --engine ray --address auto", given=address)  # fmt: skip
    try:  # Ray's own notices (INFO, WARNING) are not imgclf's to print; its errors are
        if address:
            ray.init(address=address, logging_level=logging.ERROR)
        else:
            _init_here(ray)
    except ConnectionError as e:
        raise option_error(
            "address", "{address} {given}: cannot connect to a Ray cluster ({why})", given=address, why=e
        ) from None


#: Settings of a Ray started here. Ray's disk guard measures a share of the disk, not room: once the
#: disk under its temp folder is 95% full it refuses to spill objects and its raylet logs an error
#: every 10 s, however many gigabytes are free (10 GB of 252 on a CI machine; ray-project/ray#36959).
#: 1 turns the guard off; spilling that finds no room still fails the job with Ray's error.
LOCAL_RAY_CONFIG = {"local_fs_capacity_threshold": 1.0}


def _init_here(ray) -> None:
    """Start Ray here, or join the cluster RAY_ADDRESS or ``ray start`` names (as ``ray.init()``
    does): a cluster's settings are its own, so they are only given to a Ray started here."""
    try:
        ray.init(include_dashboard=False, logging_level=logging.ERROR, _system_config=LOCAL_RAY_CONFIG)
    except ValueError as e:
        if "_system_config" not in str(e):
            raise
        ray.init(include_dashboard=False, logging_level=logging.ERROR)


def _run(ray, folder: ResultFolder, fmt: str, sources: list[Input], model_file: ModelFile, metadata: dict, **options):
    if options["workers"] is None:  # every step but scoring reserves no CPU: the pool may hold them all
        options["workers"] = _max_workers(ray, options["cpus_per_worker"], options["gpus_per_worker"])
    readers = io_tasks(options["workers"])
    plain = [s for s in sources if s.kind != "manifest"]
    listed = list(iter_image_paths(plain))
    skipped = sum(p in folder.done for p in listed) if len(folder.done) else 0
    listed = [p for p in listed if p not in folder.done] if skipped else listed
    datasets = _listed_dataset(ray, listed, readers) if listed else []
    datasets += [_manifest_dataset(ray, s.text, folder.done, readers) for s in sources if s.kind == "manifest"]
    if not datasets:
        return ScoringSummary(folder.path, 0, 0, skipped, 0.0, engine="ray")
    images = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
    results = predict_dataset(model_file, images, metadata=metadata, **options)
    writing = {"ray_remote_args": IO_TASK, "concurrency": readers, "min_rows_per_file": ROWS_PER_FILE}
    staging = folder.staging_folder()
    try:
        if fmt == "parquet":
            results.write_parquet(str(staging), schema=arrow_schema(metadata), **writing)
        elif fmt == "csv":
            results = results.map_batches(_lists_as_json, batch_format="pyarrow", compute=_tasks(ray, readers),
                                          **IO_TASK)  # fmt: skip
            results.write_csv(str(staging), **writing)
        else:
            results.write_json(str(staging), **writing)
    except Exception as e:
        cause = _imgclf_cause(e)
        if cause is not None:
            raise cause from None
        raise
    adopted = folder.adopt(staging)
    rows, failed = (sum(x) for x in zip((0, 0), *(count_rows(p, fmt) for p in adopted)))
    return ScoringSummary(folder.path, rows - failed, failed, skipped, 0.0, engine="ray")


def _lists_as_json(batch):
    """CSV has no lists: the top-k columns become JSON arrays, as the local CSV writer writes them."""
    import json

    import pyarrow as pa

    for name in ("top_labels", "top_probabilities"):
        values = [None if v is None else json.dumps(v) for v in batch.column(name).to_pylist()]
        batch = batch.set_column(batch.schema.get_field_index(name), name, pa.array(values, pa.string()))
    return batch


def _imgclf_cause(error: BaseException) -> ImgclfError | None:
    """The imgclf error inside a Ray task error, if that is what failed."""
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, ImgclfError):
            return error
        error = getattr(error, "cause", None) or error.__cause__
        seen += 1
    return None
