"""The FastAPI app: a page at ``/`` and a JSON API under ``/v1``.

The model and the batching queue are created once at start-up (lifespan) and
shared by all requests (:mod:`imgclf.serve.state`); the routes live in
:mod:`imgclf.serve.routes`. Uploads are decoded in a thread pool, content is
sniffed from the bytes (never trusted from a name or header), and every error
is a JSON ``{"error": ...}`` with a 4xx status, never a traceback
(:mod:`imgclf.serve.handlers`). Memory is bounded whatever arrives (see
:mod:`imgclf.serve.limits`): a pixel limit read from each image's header, a
budget for decoding, one for request bodies, and a cap on images waiting to be
scored.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TextIO

from fastapi import FastAPI

from imgclf.errors import MissingDependencyError
from imgclf.inference.loading import load_predictor
from imgclf.inference.predictor import Predictor
from imgclf.options import COMMANDS, SERVE_MAX_BATCH, SERVE_MAX_WAIT_MS, check, install_hint, option_error, validate
from imgclf.serve.access import AccessLog
from imgclf.serve.batching import Batcher
from imgclf.serve.handlers import EXCEPTION_HANDLERS
from imgclf.serve.hosts import HostCheck
from imgclf.serve.limits import (
    BODIES_IN_FLIGHT,
    DECODE_MEMORY_BYTES,
    MAX_FILES,
    MAX_REQUEST_BYTES,
    PENDING_IMAGES,
    READ_TIMEOUT,
    SERVE_MAX_PIXELS,
    BodyBudget,
    DecodeBudget,
    tune_malloc,
)
from imgclf.serve.routes import api_router, pages
from imgclf.serve.state import ServeState
from imgclf.version import __version__

#: The job size a server declares: unbounded, so every request runs on the same engine.
UNBOUNDED_JOB = 2**31


def create_app(
    model: str | Path | Predictor,
    *,
    max_batch: int = SERVE_MAX_BATCH,
    max_wait_ms: float = SERVE_MAX_WAIT_MS,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    decode_threads: int = 4,
    max_pixels: int = SERVE_MAX_PIXELS,
    decode_memory_bytes: int = DECODE_MEMORY_BYTES,
    max_files: int = MAX_FILES,
    read_timeout: float = READ_TIMEOUT,
    api_key: str | None = None,
    cors_origins: Sequence[str] = (),
    allowed_hosts: Sequence[str] | None = None,
    engine: str = "auto",
    precision: str = "auto",
    access_log: TextIO | None = None,
) -> FastAPI:
    """The app for ``model`` (a path to an .imgclf/.onnx file, or a loaded predictor).

    ``max_pixels`` refuses larger images from their header (413);
    ``decode_memory_bytes`` bounds what concurrent decodes use together;
    ``read_timeout`` answers 408 to a body that stops arriving; ``api_key``
    makes ``/v1/*`` require ``X-API-Key: KEY`` (or ``Authorization: Bearer
    KEY``); ``cors_origins`` lets pages from those origins call the API
    (``*``: any); ``allowed_hosts`` limits the Host header (None: any).
    ``engine`` and ``precision``: as :func:`imgclf.nets.engines.choose_engine` (a
    server is a long job, so ``auto`` takes the fastest precision the model allows).
    ``access_log``: a stream to write one line per request to (``imgclf serve`` gives
    stderr unless ``--quiet``; :mod:`imgclf.serve.access`).
    """
    try:
        from fastapi_offline import FastAPIOffline
    except ModuleNotFoundError:
        raise MissingDependencyError(f"'fastapi-offline' is not installed: {install_hint('serve')}") from None

    _check_options(max_batch=max_batch, max_wait_ms=max_wait_ms, max_request_bytes=max_request_bytes,
                   max_pixels=max_pixels, decode_memory_bytes=decode_memory_bytes, max_files=max_files,
                   read_timeout=read_timeout, api_key=api_key, engine=engine, precision=precision,
                   cors_origins=cors_origins, allowed_hosts=allowed_hosts)  # fmt: skip
    if isinstance(model, (str, Path)):
        predictor = load_predictor(model, engine=engine, precision=precision)
    else:
        predictor = model
    if predictor.job_size is None:  # a server's job has no end: one engine, built once, named by /v1/model
        predictor.job_size = UNBOUNDED_JOB
    name = Path(model).name if isinstance(model, (str, Path)) else getattr(predictor, "arch", "model")
    state = ServeState(predictor=predictor, name=name, max_batch=max_batch, max_wait_ms=max_wait_ms,
                       decode_threads=decode_threads, max_request_bytes=max_request_bytes, max_pixels=max_pixels,
                       max_files=max_files, read_timeout=read_timeout, api_key=api_key,
                       decode_budget=DecodeBudget(decode_memory_bytes),
                       bodies=BodyBudget(BODIES_IN_FLIGHT * max_request_bytes))  # fmt: skip

    app = FastAPIOffline(title="imgclf", version=__version__, lifespan=lifespan, redoc_url=None,
                         exception_handlers=EXCEPTION_HANDLERS,
                         description="Score images with a trained imgclf model. Errors are JSON "
                                     "`{\"error\": \"...\"}` with a 4xx status.")  # fmt: skip
    app.state.serve = state
    app.state.predictor = predictor
    app.state.decode_budget = state.decode_budget
    if cors_origins:
        from imgclf.serve.cors import CORS

        app.add_middleware(CORS, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Content-Type", "X-API-Key", "Authorization"])  # fmt: skip
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=allowed_hosts)
    if access_log is not None:  # added last: the outermost, so it logs every answer of the app
        app.add_middleware(AccessLog, stream=access_log)
    app.include_router(pages)
    app.include_router(api_router(max_files=max_files, protected=api_key is not None))
    return app


def _check_options(*, max_batch: int, max_wait_ms: float, max_request_bytes: int, max_pixels: int,
                   decode_memory_bytes: int, max_files: int, read_timeout: float, api_key: str | None,
                   engine: str, precision: str, cors_origins: Sequence[str],
                   allowed_hosts: Sequence[str] | None) -> None:  # fmt: skip
    """Raise :class:`OptionError` naming the first option ``create_app`` cannot use (the schema, imgclf.options)."""
    serve = COMMANDS["serve"]
    for name, values in (("cors_origins", cors_origins), ("allowed_hosts", allowed_hosts)):
        if isinstance(values, str):  # one name given bare would be read a letter at a time
            raise option_error(name, f"{{{name}}} must be a list of names, got the text {{given}}; give [{{given}}]",
                               given=repr(values))
        if values is not None:
            check(serve[name[:-1]], list(values), name)
    validate("serve", {"max_batch": max_batch, "max_wait_ms": max_wait_ms, "max_request_bytes": max_request_bytes,
                       "max_pixels": max_pixels, "decode_memory_bytes": decode_memory_bytes, "max_files": max_files,
                       "read_timeout": read_timeout, "api_key": api_key, "engine": engine,
                       "precision": precision})  # fmt: skip


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start what every request shares, once: the batching queue (warmed up for each
    batch size), the decode threads and the cap on images waiting; stop them at the end."""
    state: ServeState = app.state.serve
    tune_malloc()
    state.batcher = Batcher(state.predictor, state.max_batch, state.max_wait_ms)
    await state.batcher.start(state.stopping)
    state.decode_pool = ThreadPoolExecutor(state.decode_threads, thread_name_prefix="imgclf-decode")
    state.pending = asyncio.Semaphore(PENDING_IMAGES)
    yield
    await state.batcher.stop()
    state.decode_pool.shutdown(wait=False)
