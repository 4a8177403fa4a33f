"""The routes: the page at ``/`` and ``/healthz`` (open to all), and the JSON API under ``/v1``.

Each route reaches the loaded model, the batching queue and the limits through
the :func:`~imgclf.serve.state.get_state` dependency. The ``/v1`` router is made
for each app (:func:`api_router`), because its OpenAPI document states that
app's limit on files and, with a key, its security.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse

from imgclf import rows
from imgclf.data.imaging import load_array
from imgclf.errors import ImageDecodeError
from imgclf.options import TOP_K
from imgclf.serve.auth import UNAUTHORIZED, require_key
from imgclf.serve.handlers import HTTPError
from imgclf.serve.schemas import (
    ErrorResponse,
    ExplainedImageResult,
    ImageExplanation,
    ModelInfo,
    PredictError,
    PredictResponse,
)
from imgclf.serve.state import ServeState, get_state
from imgclf.serve.uploads import declared_length, parse_multipart, read_body
from imgclf.version import __version__

STATIC = Path(__file__).parent / "static"

#: ``/`` and ``/healthz``: never under the API key, so a browser and a load balancer can reach them.
pages = APIRouter()


@pages.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))


@pages.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


async def model_info(state: Annotated[ServeState, Depends(get_state)]) -> ModelInfo:
    predictor = state.predictor
    return ModelInfo(name=state.name, arch=getattr(predictor, "arch", "unknown"), labels=predictor.labels,
                     input_size=predictor.preprocessing.input_size,
                     input_shape=list(predictor.preprocessing.shape), metrics=predictor.metrics_, version=__version__,
                     **predictor.engine_choice().to_dict())  # fmt: skip


async def predict(
    request: Request,
    state: Annotated[ServeState, Depends(get_state)],
    top_k: int = Query(TOP_K, ge=1, le=100),
    explain: bool = Query(False, description="also return what the model looked at: the class activation map of "
                          "the predicted label (explanation: cells and a small PNG)"),
) -> JSONResponse:
    """Score images: a multipart upload (field ``files`` or ``file``, one or many; 64 at most by default)
    or a raw image body. Each image gets a label and scores, or an error; the others are still scored."""
    started = time.perf_counter()
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    declared = declared_length(request, state.max_request_bytes)
    async with state.bodies.hold() as share:
        body = await read_body(request, declared, state.max_request_bytes, state.read_timeout, share)
        if content_type == "multipart/form-data":
            uploads = await parse_multipart(request, body, state.max_files)
        elif content_type.startswith("image/") or content_type == "application/octet-stream":
            uploads = [("upload", body)]
        elif not content_type and not body:  # nothing sent at all: no image, as the docs say (was a 415)
            raise HTTPError(422, "no image in the request; send an image body (Content-Type image/*) or files in "
                                 "the multipart field 'files'")  # fmt: skip
        else:
            raise HTTPError(415, f"send an image body (Content-Type image/*) or multipart/form-data, "
                                 f"not '{content_type or 'nothing'}'")  # fmt: skip
        del body
        if not uploads:
            raise HTTPError(422, "no image in the request; send files in the multipart field 'files'")
        if explain:
            why = state.predictor.why_not_explainable()
            if why is not None:
                raise HTTPError(422, f"explain: cannot explain this model's predictions: {why}")
        scored = await asyncio.gather(*(score(state, data, fname, top_k, explain) for fname, data in uploads))
    results = [r for r, _ in scored]
    response = PredictResponse(results=results, model=state.name,
                               elapsed_ms=round((time.perf_counter() - started) * 1000, 2))  # fmt: skip
    if all(r.error for r in results):
        status = 413 if any(s == 413 for _, s in scored) else 415
        return JSONResponse({"error": results[0].error, **response.model_dump(exclude_none=True)}, status)
    return JSONResponse(response.model_dump(exclude_none=True))


async def score(
    state: ServeState, data: bytes, filename: str, top_k: int, explain: bool = False
) -> tuple[ExplainedImageResult, int]:
    """One image decoded (in the decode threads, within the decode budget) and scored
    (through the batching queue), with the status its error would have (200 if none)."""
    loop = asyncio.get_running_loop()
    async with state.pending:
        try:
            array = await loop.run_in_executor(state.decode_pool, decode, state, data, filename)
        except ImageDecodeError as e:
            return ExplainedImageResult(**rows.document(rows.failed(filename, str(e)))), e.http_status
        if explain:  # the graph with the maps, outside the batching queue (an explanation is asked for one by one)
            explained = await loop.run_in_executor(state.decode_pool, explain_array, state, data, filename, array)
            return ExplainedImageResult(**explained.prediction.to_dict(top_k, file=filename),
                                        explanation=explanation_of(explained)), 200  # fmt: skip
        p = await state.batcher.predict(array)
    return ExplainedImageResult(**p.to_dict(top_k, file=filename)), 200


def explain_array(state: ServeState, data: bytes, filename: str, array):
    """The explanation of one decoded image, its map left at the cells (no full-size map)."""
    return state.predictor._explanations([(data, filename, array)], False)[0]


def explanation_of(explained) -> ImageExplanation:
    import base64

    from imgclf.inference.explain import map_png

    return ImageExplanation(label=explained.label, cells=[[round(float(v), 5) for v in row] for row in explained.cells],
                            png=base64.b64encode(map_png(explained.cells)).decode("ascii"),
                            crop=[round(float(v), 2) for v in explained.crop], image_width=explained.size[0],
                            image_height=explained.size[1])  # fmt: skip


def decode(state: ServeState, data: bytes, filename: str):
    return load_array(data, state.predictor.preprocessing, filename, max_pixels=state.max_pixels,
                      reserve=state.decode_budget.reserve)  # fmt: skip


def api_router(*, max_files: int, protected: bool) -> APIRouter:
    """``GET /v1/model`` and ``POST /v1/predict``; with ``protected``, both depend on the API key.

    ``max_files`` is only what the OpenAPI document states; the route reads the
    limit it enforces from the app's state.
    """
    router = APIRouter(dependencies=[Depends(require_key)] if protected else [],
                       responses=UNAUTHORIZED if protected else {})  # fmt: skip
    router.add_api_route("/v1/model", model_info, methods=["GET"], response_model=ModelInfo)
    router.add_api_route("/v1/predict", predict, methods=["POST"], response_model=PredictResponse,
                         response_model_exclude_none=True, responses=predict_responses(max_files),
                         openapi_extra=predict_request_body(max_files))  # fmt: skip
    return router


def predict_responses(max_files: int) -> dict[int | str, dict[str, Any]]:
    """The statuses ``POST /v1/predict`` answers besides 200, as the OpenAPI document lists them."""
    return {
        400: {
            "model": ErrorResponse,
            "description": "malformed request: a body that cannot be parsed (a multipart body cut short), or the "
            "client went away",
        },
        408: {"model": ErrorResponse, "description": "the body stopped arriving, or arrives too slowly"},
        503: {"model": ErrorResponse, "description": "no room for more request bodies now; retry (Retry-After)"},
        413: {
            "model": PredictError,
            "description": f"request over the size limit, more than {max_files} files, or every image too large",
        },
        415: {"model": PredictError, "description": "not an image, or no image could be read"},
        422: {"model": ErrorResponse, "description": "no image in the request, or a bad parameter"},
    }


def predict_request_body(max_files: int) -> dict[str, Any]:
    """The request bodies ``POST /v1/predict`` takes (read by hand, so declared here for the OpenAPI document)."""
    files = {"type": "array", "minItems": 1, "maxItems": max_files, "items": {"type": "string", "format": "binary"}}
    return {
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "required": ["files"], "properties": {"files": files}}
                },
                "image/*": {"schema": {"type": "string", "format": "binary"}},
            }
        }
    }
