"""The API's typed responses: what each route answers, documented in the OpenAPI page."""

from __future__ import annotations

from pydantic import BaseModel


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
