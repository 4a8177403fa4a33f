"""The API's typed responses: what each route answers, documented in the OpenAPI page."""

from __future__ import annotations

from pydantic import BaseModel, Field, create_model

from imgclf import rows


class LabelScore(BaseModel):
    label: str
    probability: float


def _image_result() -> type[BaseModel]:
    """The typed form of :mod:`imgclf.rows`'s prediction row, field by field from its table."""
    types = {"name": str, "text": str | None, "number": float | None, "flag": bool | None,
             "ranking": list[LabelScore] | None, "labelset": list[LabelScore] | None}  # fmt: skip
    fields = {
        f.name: (types[f.kind], Field(... if f.kind == "name" else None, description=f.help)) for f in rows.FIELDS
    }
    return create_model("ImageResult", __doc__="One image's outcome: a prediction row (imgclf.rows).", **fields)


ImageResult = _image_result()


class PredictResponse(BaseModel):
    results: list[ImageResult]
    model: str
    elapsed_ms: float
    row_version: int = Field(rows.ROW_VERSION, description="the version of the prediction row (imgclf.rows)")


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
