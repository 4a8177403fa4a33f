"""The FastAPI app: a page at ``/`` and a JSON API under ``/v1``.

The model and the batching queue are created once at start-up (lifespan) and
shared by all requests. Uploads are decoded in a thread pool, content is
sniffed from the bytes (never trusted from a name or header), and every error
is a JSON ``{"error": ...}`` with a 4xx status, never a traceback.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel

from imgclf.data.imaging import load_array
from imgclf.errors import ImageDecodeError, ImgclfError
from imgclf.inference.loading import load_predictor
from imgclf.inference.predictor import Predictor
from imgclf.serve.batching import Batcher

STATIC = Path(__file__).parent / "static"


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's per-thread malloc arenas. Decode threads otherwise each keep
    their own heap, and a long-running server's memory creeps up (measured in
    benchmarks/serve.py). No-op where glibc is not the allocator."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        ctypes.CDLL(name).mallopt(-8, arenas)  # -8 is M_ARENA_MAX
    except (OSError, AttributeError):
        pass


class LabelScore(BaseModel):
    label: str
    probability: float


class ImageResult(BaseModel):
    file: str
    label: str | None = None
    probability: float | None = None
    scores: list[LabelScore] | None = None
    error: str | None = None


class PredictResponse(BaseModel):
    results: list[ImageResult]
    model: str
    elapsed_ms: float


class ModelInfo(BaseModel):
    name: str
    arch: str
    labels: list[str]
    input_size: int
    metrics: dict | None = None
    version: str


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


def create_app(
    model: str | Path | Predictor,
    *,
    max_batch: int = 16,
    max_wait_ms: float = 5.0,
    max_request_bytes: int = 10 * 1024 * 1024,
    decode_threads: int = 4,
) -> FastAPI:
    """The app for ``model`` (a path to an .imgclf/.onnx file, or a loaded predictor)."""
    from imgclf.errors import OptionError
    from imgclf.version import __version__

    if max_batch < 1:
        raise OptionError(f"max_batch must be at least 1 (1 turns batching off), got {max_batch}")
    if max_wait_ms < 0:
        raise OptionError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
    if max_request_bytes < 1:
        raise OptionError(f"max_request_bytes must be positive, got {max_request_bytes}")
    predictor = load_predictor(model) if isinstance(model, (str, Path)) else model
    name = Path(model).name if isinstance(model, (str, Path)) else getattr(predictor, "arch", "model")
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        limit_malloc_arenas()
        state["batcher"] = Batcher(predictor, max_batch, max_wait_ms)
        await state["batcher"].start()
        state["decode"] = ThreadPoolExecutor(decode_threads, thread_name_prefix="imgclf-decode")
        yield
        await state["batcher"].stop()
        state["decode"].shutdown(wait=False)

    app = FastAPI(title="imgclf", version=__version__, lifespan=lifespan,
                  description="Score images with a trained imgclf model.")  # fmt: skip
    app.state.predictor = predictor
    app.state.state = state

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(ImgclfError)
    async def _imgclf_error(request: Request, exc: ImgclfError):
        return JSONResponse({"error": str(exc)}, status_code=exc.http_status)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)

    async def read_limited(request: Request) -> bytes:
        """The body, refused with 413 as soon as it passes the limit."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_request_bytes:
            raise HTTPError(413, f"request is {int(declared):,} bytes; the limit is {max_request_bytes:,}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_request_bytes:
                raise HTTPError(413, f"request is larger than the {max_request_bytes:,}-byte limit")
            chunks.append(chunk)
        return b"".join(chunks)

    async def score(data: bytes, filename: str, top_k: int) -> ImageResult:
        loop = asyncio.get_running_loop()
        try:
            array = await loop.run_in_executor(state["decode"], load_array, data, predictor.preprocessing, filename)
        except ImageDecodeError as e:
            return ImageResult(file=filename, error=str(e))
        p = await state["batcher"].predict(array)
        return ImageResult(file=filename, label=p.label, probability=p.probability,
                           scores=[LabelScore(label=lbl, probability=v) for lbl, v in p.top(top_k)])  # fmt: skip

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/model", response_model=ModelInfo)
    async def model_info() -> ModelInfo:
        metrics = predictor.metrics_
        return ModelInfo(name=name, arch=getattr(predictor, "arch", "unknown"), labels=predictor.labels,
                         input_size=predictor.preprocessing.input_size, metrics=metrics, version=__version__)  # fmt: skip

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses={
            413: {"description": "request or image too large"},
            415: {"description": "not an image"},
            422: {"description": "no image in the request"},
        },  # fmt: skip
        openapi_extra={
            "requestBody": {
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                        }
                    },
                    "image/*": {"schema": {"type": "string", "format": "binary"}},
                }
            }
        },  # fmt: skip
    )
    async def predict(request: Request, top_k: int = Query(3, ge=1, le=100)) -> JSONResponse:
        """Score images: a multipart upload (field ``files`` or ``file``, one or many) or a raw image body."""
        started = time.perf_counter()
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await read_limited(request)
        if content_type == "multipart/form-data":
            uploads = await parse_multipart(request, body)
        elif content_type.startswith("image/") or content_type == "application/octet-stream":
            uploads = [("upload", body)]
        else:
            raise HTTPError(415, f"send an image body (Content-Type image/*) or multipart/form-data, "
                                 f"not '{content_type or 'nothing'}'")  # fmt: skip
        if not uploads:
            raise HTTPError(422, "no image in the request; send files in the multipart field 'files'")
        results = await asyncio.gather(*(score(data, fname, top_k) for fname, data in uploads))
        response = PredictResponse(results=list(results), model=name,
                                   elapsed_ms=round((time.perf_counter() - started) * 1000, 2))  # fmt: skip
        status = 200
        if all(r.error for r in results):
            status = 413 if any("more pixels than" in (r.error or "") for r in results) else 415
            return JSONResponse({"error": results[0].error, **response.model_dump()}, status_code=status)
        return JSONResponse(response.model_dump(exclude_none=True), status_code=status)

    async def parse_multipart(request: Request, body: bytes) -> list[tuple[str, bytes]]:
        from starlette.requests import Request as StarletteRequest

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        replay = StarletteRequest(request.scope, receive)
        try:
            form = await replay.form(max_files=64, max_fields=64)
        except Exception as e:
            raise HTTPError(422, f"malformed multipart body ({type(e).__name__})") from None
        uploads = []
        for key, value in form.multi_items():
            if hasattr(value, "read"):
                uploads.append((value.filename or key, await value.read()))
        await form.close()
        return uploads

    return app
