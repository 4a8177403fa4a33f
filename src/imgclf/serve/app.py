"""The FastAPI app: a page at ``/`` and a JSON API under ``/v1``.

The model and the batching queue are created once at start-up (lifespan) and
shared by all requests. Uploads are decoded in a thread pool, content is
sniffed from the bytes (never trusted from a name or header), and every error
is a JSON ``{"error": ...}`` with a 4xx status, never a traceback. Memory is
bounded whatever arrives (see :mod:`imgclf.serve.limits`): a pixel limit read
from each image's header, a budget for decoding, one for request bodies, and a
cap on images waiting to be scored.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from imgclf.data.imaging import load_array
from imgclf.errors import ImageDecodeError, ImgclfError, MissingDependencyError, OptionError
from imgclf.inference.loading import load_predictor
from imgclf.inference.predictor import Predictor
from imgclf.options import SERVE_MAX_BATCH, SERVE_MAX_WAIT_MS, TOP_K, install_hint, validate
from imgclf.serve.batching import Batcher
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

STATIC = Path(__file__).parent / "static"


class LabelScore(BaseModel):
    label: str
    probability: float


class ImageResult(BaseModel):
    """One image's outcome: ``label``/``probability``/``scores``, or ``error``."""

    file: str
    label: str | None = None
    probability: float | None = None
    scores: list[LabelScore] | None = None
    error: str | None = None


class PredictResponse(BaseModel):
    results: list[ImageResult]
    model: str
    elapsed_ms: float


class ErrorResponse(BaseModel):
    """Every error: one line saying what is wrong and what to do."""

    error: str


class PredictError(ErrorResponse):
    """Every image in the request failed: the first error, and each image's."""

    results: list[ImageResult] | None = None
    model: str | None = None
    elapsed_ms: float | None = None


class ModelInfo(BaseModel):
    name: str
    arch: str
    labels: list[str]
    input_size: int
    metrics: dict | None = None
    version: str
    engine: str  # what runs the network, at which precision, chosen for this CPU's capabilities
    precision: str
    cpu: str


#: The job size a server declares: unbounded, so every request runs on the same engine.
UNBOUNDED_JOB = 2**31

key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the key given to imgclf serve")
bearer = HTTPBearer(auto_error=False, description="the key given to imgclf serve, as a bearer token")


class HTTPError(Exception):
    """An error answered as ``{"error": message}``; ``close`` ends the connection
    (the body was not read to its end, so the connection cannot be reused)."""

    def __init__(self, status: int, message: str, *, close: bool = False, headers: dict | None = None):
        self.status, self.message = status, message
        self.headers = {**(headers or {}), **({"Connection": "close"} if close else {})}


class HostCheck:
    """Answer only requests whose Host header names an allowed host (any port):
    a server on loopback then cannot be reached from a web page through DNS
    rebinding. ``*`` allows any host."""

    def __init__(self, app: ASGIApp, allowed: Sequence[str]):
        self.app = app
        self.allowed = {h.lower().strip("[]") for h in allowed}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and "*" not in self.allowed:
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
            name = _host_name(host)
            if name not in self.allowed:
                response = JSONResponse({"error": f"Host '{host}' is not served here; use one of "
                                                  f"{', '.join(sorted(self.allowed))} (imgclf serve --allowed-host)"},
                                        status_code=400)  # fmt: skip
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _host_name(host: str) -> str:
    """The name in a Host header: 'example.com:8000' -> 'example.com', '[::1]:8000' -> '::1'."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


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
    """
    from imgclf.version import __version__

    try:
        from fastapi_offline import FastAPIOffline
    except ModuleNotFoundError:
        raise MissingDependencyError(f"'fastapi-offline' is not installed: {install_hint('serve')}") from None

    validate("serve", {"max_batch": max_batch, "max_wait_ms": max_wait_ms, "max_request_bytes": max_request_bytes,
                       "max_pixels": max_pixels, "decode_memory_bytes": decode_memory_bytes, "max_files": max_files,
                       "read_timeout": read_timeout, "engine": engine, "precision": precision})  # fmt: skip
    if api_key is not None and not api_key.strip():
        raise OptionError("the API key is empty; give a non-empty key or none")
    if isinstance(model, (str, Path)):
        predictor = load_predictor(model, engine=engine, precision=precision)
    else:
        predictor = model
    if predictor.job_size is None:  # a server's job has no end: one engine, built once, named by /v1/model
        predictor.job_size = UNBOUNDED_JOB
    name = Path(model).name if isinstance(model, (str, Path)) else getattr(predictor, "arch", "model")
    state: dict = {}
    decode_budget = DecodeBudget(decode_memory_bytes)
    bodies = BodyBudget(BODIES_IN_FLIGHT * max_request_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        tune_malloc()
        state["batcher"] = Batcher(predictor, max_batch, max_wait_ms)
        await state["batcher"].start()
        state["decode"] = ThreadPoolExecutor(decode_threads, thread_name_prefix="imgclf-decode")
        state["pending"] = asyncio.Semaphore(PENDING_IMAGES)
        yield
        await state["batcher"].stop()
        state["decode"].shutdown(wait=False)

    app = FastAPIOffline(title="imgclf", version=__version__, lifespan=lifespan, redoc_url=None,
                         description="Score images with a trained imgclf model. Errors are JSON "
                                     "`{\"error\": \"...\"}` with a 4xx status.")  # fmt: skip
    app.state.predictor = predictor
    app.state.state = state
    app.state.decode_budget = decode_budget
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Content-Type", "X-API-Key", "Authorization"])  # fmt: skip
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=allowed_hosts)

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError):
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(ImgclfError)
    async def _imgclf_error(request: Request, exc: ImgclfError):
        return JSONResponse({"error": str(exc)}, status_code=exc.http_status)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(request: Request, exc: StarletteHTTPException):
        path = request.url.path
        if exc.status_code == 404:
            message = f"no such endpoint: {path}; the API is described at /docs"
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            message = f"{request.method} is not allowed on {path}" + (f"; use {allowed}" if allowed else "")
        else:
            message = str(exc.detail)
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        problems = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ())[1:]) or "request"
            problems.append(
                f"{where}: {e.get('msg', 'invalid')}" + (f" (got {str(e['input'])[:40]!r})" if "input" in e else "")
            )
        return JSONResponse({"error": "; ".join(problems)}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)

    async def require_key(
        key: Annotated[str | None, Security(key_header)] = None,
        auth: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)] = None,
    ) -> None:
        given = key or (auth.credentials if auth else "")
        if not secrets.compare_digest(given.encode(), (api_key or "").encode()):
            raise HTTPError(401, "missing or wrong API key: send it in the X-API-Key header"
                                 if not given else "wrong API key", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    protected = [Depends(require_key)] if api_key else []
    error_responses = {401: {"model": ErrorResponse, "description": "missing or wrong API key"}} if api_key else {}

    def declared_length(request: Request) -> int | None:
        """The Content-Length, refused at once if it is not a number or over the limit."""
        declared = request.headers.get("content-length")
        if declared is None:
            return None
        if not declared.strip().isdigit():
            raise HTTPError(400, f"Content-Length '{declared}' is not a number", close=True)
        if int(declared) > max_request_bytes:
            raise HTTPError(413, f"request is {int(declared):,} bytes; the limit is {max_request_bytes:,}", close=True)
        return int(declared)

    async def read_body(request: Request, declared: int | None) -> bytes:
        """The body, refused with 413 as soon as it passes the limit and with 408
        if it stops arriving (a body shorter than its Content-Length)."""
        chunks, size = [], 0
        stream = request.stream()
        while True:
            try:
                chunk = await asyncio.wait_for(anext(stream), read_timeout)
            except StopAsyncIteration:
                break
            except (asyncio.TimeoutError, TimeoutError):
                of = f" of {declared:,}" if declared is not None else ""
                raise HTTPError(408, f"request body stopped arriving: nothing for {read_timeout:g} s after "
                                     f"{size:,}{of} bytes", close=True) from None  # fmt: skip
            except ClientDisconnect:
                raise HTTPError(400, "client disconnected before sending the whole body", close=True) from None
            size += len(chunk)
            if size > max_request_bytes:
                raise HTTPError(413, f"request is larger than the {max_request_bytes:,}-byte limit", close=True)
            chunks.append(chunk)
        return b"".join(chunks)

    def decode(data: bytes, filename: str):
        return load_array(data, predictor.preprocessing, filename, max_pixels=max_pixels,
                          reserve=decode_budget.reserve)  # fmt: skip

    async def score(data: bytes, filename: str, top_k: int) -> tuple[ImageResult, int]:
        loop = asyncio.get_running_loop()
        async with state["pending"]:
            try:
                array = await loop.run_in_executor(state["decode"], decode, data, filename)
            except ImageDecodeError as e:
                return ImageResult(file=filename, error=str(e)), e.http_status
            p = await state["batcher"].predict(array)
        return ImageResult(file=filename, label=p.label, probability=p.probability,
                           scores=[LabelScore(label=lbl, probability=v) for lbl, v in p.top(top_k)]), 200  # fmt: skip

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/model", response_model=ModelInfo, dependencies=protected, responses=error_responses)
    async def model_info() -> ModelInfo:
        metrics = predictor.metrics_
        return ModelInfo(name=name, arch=getattr(predictor, "arch", "unknown"), labels=predictor.labels,
                         input_size=predictor.preprocessing.input_size, metrics=metrics, version=__version__,
                         **predictor.engine_choice().to_dict())  # fmt: skip

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        response_model_exclude_none=True,
        dependencies=protected,
        responses={
            **error_responses,
            400: {"model": ErrorResponse, "description": "malformed request, or the client went away"},
            408: {"model": ErrorResponse, "description": "the body stopped arriving"},
            413: {"model": PredictError, "description": f"request over the size limit, more than {max_files} files, "
                                                        "or every image too large"},
            415: {"model": PredictError, "description": "not an image, or no image could be read"},
            422: {"model": ErrorResponse, "description": "no image in the request, a malformed body, or a bad parameter"},
        },
        openapi_extra={
            "requestBody": {
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["files"],
                            "properties": {
                                "files": {
                                    "type": "array",
                                    "minItems": 1,
                                    "maxItems": max_files,
                                    "items": {"type": "string", "format": "binary"},
                                }
                            },
                        }
                    },
                    "image/*": {"schema": {"type": "string", "format": "binary"}},
                }
            }
        },
    )  # fmt: skip
    async def predict(request: Request, top_k: int = Query(TOP_K, ge=1, le=100)) -> JSONResponse:
        """Score images: a multipart upload (field ``files`` or ``file``, one or many; 64 at most by default)
        or a raw image body. Each image gets a label and scores, or an error; the others are still scored."""
        started = time.perf_counter()
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        declared = declared_length(request)
        async with bodies.reserve(max_request_bytes if declared is None else declared):
            body = await read_body(request, declared)
            if content_type == "multipart/form-data":
                uploads = await parse_multipart(request, body)
            elif content_type.startswith("image/") or content_type == "application/octet-stream":
                uploads = [("upload", body)]
            else:
                raise HTTPError(415, f"send an image body (Content-Type image/*) or multipart/form-data, "
                                     f"not '{content_type or 'nothing'}'")  # fmt: skip
            del body
            if not uploads:
                raise HTTPError(422, "no image in the request; send files in the multipart field 'files'")
            scored = await asyncio.gather(*(score(data, fname, top_k) for fname, data in uploads))
        results = [r for r, _ in scored]
        response = PredictResponse(results=results, model=name,
                                   elapsed_ms=round((time.perf_counter() - started) * 1000, 2))  # fmt: skip
        if all(r.error for r in results):
            status = 413 if any(s == 413 for _, s in scored) else 415
            return JSONResponse({"error": results[0].error, **response.model_dump(exclude_none=True)}, status)
        return JSONResponse(response.model_dump(exclude_none=True))

    async def parse_multipart(request: Request, body: bytes) -> list[tuple[str, bytes]]:
        from starlette.formparsers import MultiPartException
        from starlette.requests import Request as StarletteRequest

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        replay = StarletteRequest(request.scope, receive)
        try:
            form = await replay.form(max_files=max_files, max_fields=max_files)
        except (MultiPartException, StarletteHTTPException) as e:  # Starlette wraps the first in the second
            problem = str(getattr(e, "detail", None) or e)
            if problem.startswith("Too many files"):
                raise HTTPError(413, f"a request may carry at most {max_files} files; "
                                     "send the others in further requests") from None  # fmt: skip
            if problem.startswith("Too many fields"):
                raise HTTPError(413, f"a request may carry at most {max_files} form fields") from None
            raise HTTPError(422, f"malformed multipart body ({problem})") from None
        except Exception as e:
            raise HTTPError(422, f"malformed multipart body ({type(e).__name__})") from None
        uploads = []
        for key, value in form.multi_items():
            if hasattr(value, "read"):
                uploads.append((value.filename or key, await value.read()))
        await form.close()
        return uploads

    return app
