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


class ImageExplanation(BaseModel):
    """What the model looked at (``explain=true``): the class activation map of the predicted
    label on the centre crop the network saw (imgclf.inference.explain)."""

    label: str = Field(description="the label the map explains: the predicted one")
    cells: list[list[float]] = Field(description="the map, rows of cells (7x7 for Lite0), in the head's logit "
                                     "units: higher = more evidence for the label; their mean is its logit")  # fmt: skip
    png: str = Field(description="the same map as a base64 greyscale PNG, one pixel per cell, 0 its minimum and "
                     "255 its maximum")  # fmt: skip
    crop: list[float] = Field(description="left, top, right, bottom of the crop the map covers, in pixels of the "
                              "whole image turned upright per its EXIF orientation; outside it the map is its "
                              "minimum")  # fmt: skip
    image_width: int = Field(description="width of the whole upright image")
    image_height: int = Field(description="height of the whole upright image")


class ExplainedImageResult(ImageResult):  # type: ignore[valid-type, misc]
    """One image's outcome (a prediction row), with ``explanation`` when ``explain=true`` was asked."""

    explanation: ImageExplanation | None = None


class PredictResponse(BaseModel):
    results: list[ExplainedImageResult]
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
    input_shape: list[int]  # [height, width] of what the network sees: the square, or a whole-frame rectangle
    metrics: dict | None = None
    version: str
    engine: str  # what runs the network, at which precision, chosen for this CPU's capabilities
    precision: str
    cpu: str
