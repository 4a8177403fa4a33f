"""The metadata schema of both model files, checked in one place on every load.

An ``.imgclf`` file keeps its metadata as JSON in the safetensors header, an
exported ``.onnx`` file in its ``imgclf`` metadata property. Either may come
from someone else, so every field is checked for type and range before anything
is built from it: an ``input_size`` of 100000 would otherwise ask for gigabytes
per image, a ``timm_name`` such as ``hf-hub:x/y`` would make timm reach for the
network, and a string where a number belongs would surface as a traceback (or an
HTTP 500 under ``serve``). A file that fails gets one :class:`ModelFileError`
line naming the file, the field and what was wrong.

The ranges are wide enough for every pretrained configuration timm ships
(input sizes up to 1024, ``crop_pct`` up to 1.15, means in [0, 1], standard
deviations from 0.143 to 1) and narrow enough that no value can exhaust memory.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

from imgclf.data.imaging import RESAMPLING, Preprocessing
from imgclf.errors import ModelFileError
from imgclf.inference.unknown import MAX_BANK

FORMAT_NAME = "imgclf"
#: The newest format this imgclf reads. A single-label file is still written as version 1, so
#: every older imgclf reads it; a multi-label file (sigmoid head, ``multilabel`` field) is
#: version 2, so an older imgclf refuses it in one line instead of applying softmax.
FORMAT_VERSION = 2
SINGLE_LABEL_FORMAT_VERSION = 1
MULTILABEL_FORMAT_VERSION = 2
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 16, 1024
MIN_CROP_PCT, MAX_CROP_PCT = 0.25, 1.5
MIN_STD = 0.01
MAX_FEATURES = 65_536
MAX_LABELS = 100_000
#: Most training images whose features a model file may keep (train --keep-features-mb).
MAX_STORED_IMAGES = 10_000_000
MAX_K = 1000

_Unit = Annotated[float, Field(ge=0.0, le=1.0)]
_Std = Annotated[float, Field(ge=MIN_STD, le=1.0)]
_Label = Annotated[str, StringConstraints(min_length=1, max_length=255)]
_Name = Annotated[str, StringConstraints(min_length=1, max_length=200)]
_Side = Annotated[int, Field(ge=MIN_INPUT_SIZE, le=MAX_INPUT_SIZE)]


class PreprocessingSpec(BaseModel):
    """How the network wants its input (see :class:`imgclf.data.imaging.Preprocessing`)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    input_size: Annotated[int, Field(ge=MIN_INPUT_SIZE, le=MAX_INPUT_SIZE)]
    crop_pct: Annotated[float, Field(ge=MIN_CROP_PCT, le=MAX_CROP_PCT)]
    interpolation: Literal[tuple(RESAMPLING)]  # type: ignore[valid-type]
    mean: tuple[_Unit, _Unit, _Unit]
    std: tuple[_Std, _Std, _Std]
    frame: Literal["crop", "whole"] = "crop"
    #: (height, width) of a whole-frame input that is not square; each side within the input sizes allowed
    input_shape: tuple[_Side, _Side] | None = None

    @model_validator(mode="after")
    def _shape_is_a_whole_frame(self) -> PreprocessingSpec:
        if self.input_shape is not None and self.frame != "whole":
            raise ValueError("input_shape applies to the whole frame alone (frame 'whole')")
        return self

    def build(self) -> Preprocessing:
        return Preprocessing(self.input_size, self.crop_pct, self.interpolation, self.mean, self.std, self.frame,
                             self.input_shape)  # fmt: skip


class MultilabelSpec(BaseModel):
    """A multi-label model: a sigmoid per label, and the probability from which each label is
    answered (chosen on validation images at training), one per label in label order."""

    model_config = ConfigDict(strict=True, extra="allow")

    thresholds: Annotated[list[_Unit], Field(min_length=2, max_length=MAX_LABELS)]


class PrecisionMetrics(BaseModel):
    """Measurements at one precision (``imgclf.inference.precision``): fp32's accuracy, or a
    lossy precision's certificate, which ``auto`` reads (:func:`imgclf.nets.engines.certificate_verdict`)."""

    model_config = ConfigDict(strict=True, extra="allow")

    micro_accuracy: _Unit | None = None
    top_label_agreement: _Unit | None = None
    images: Annotated[int, Field(ge=0)] | None = None
    unseen_images: Annotated[int, Field(ge=0)] | None = None
    accuracy_change: Annotated[float, Field(ge=-1, le=1)] | None = None
    cpu: Annotated[str, StringConstraints(pattern=r"^(none|bf16|vnni|bf16\+vnni)$")] | None = None


class StoredFeaturesSpec(BaseModel):
    """How many training images' features the file keeps (:mod:`imgclf.inference.stored`); the
    tensors themselves are checked against it when ``train --from`` reads them."""

    model_config = ConfigDict(strict=True, extra="allow")

    images: Annotated[int, Field(ge=1, le=MAX_STORED_IMAGES)]
    held_out: Annotated[int, Field(ge=0, le=MAX_STORED_IMAGES)]
    dtype: Literal["float16"]

    @model_validator(mode="after")
    def _held_out_within(self) -> StoredFeaturesSpec:
        if self.held_out > self.images:
            raise ValueError(f"held_out ({self.held_out}) is more than images ({self.images})")
        return self


class TrainedOnFrom(BaseModel):
    """The model a model was trained on from (``train --from``): its file's SHA-256 and labels."""

    model_config = ConfigDict(strict=True, extra="allow")

    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    labels: Annotated[list[_Label], Field(max_length=MAX_LABELS)] | None = None
class UnknownSpec(BaseModel):
    """The unknown-input detector (:mod:`imgclf.inference.unknown`): its score's threshold
    (scores lie in [0, 2]), the rate it was placed for, and how many training vectors its bank holds."""

    model_config = ConfigDict(strict=True, extra="allow")

    method: Literal["knn-cosine"]
    k: Annotated[int, Field(ge=1, le=MAX_K)]
    threshold: Annotated[float, Field(ge=0.0, le=2.0)]
    rejection_rate: Annotated[float, Field(gt=0.0, le=0.5)]
    bank_images: Annotated[int, Field(ge=1, le=MAX_BANK)]


class _CommonMetadata(BaseModel):
    """Fields both kinds of file carry. Unknown fields are kept (newer minor versions add some)."""

    model_config = ConfigDict(strict=True, extra="allow")

    labels: Annotated[list[_Label], Field(min_length=2, max_length=MAX_LABELS)]
    arch: _Name
    preprocessing: PreprocessingSpec
    tta: bool = False
    metrics: dict[str, Any] | None = None
    versions: dict[str, str] | None = None
    precision_metrics: dict[Literal["fp32", "bf16", "int8"], PrecisionMetrics] | None = None
    calibration: dict[str, Any] | None = None
    unknown: UnknownSpec | None = None
    multilabel: MultilabelSpec | None = None

    @model_validator(mode="after")
    def _one_threshold_per_label(self):
        if self.multilabel is not None and len(self.multilabel.thresholds) != len(self.labels):
            raise ValueError(f"multilabel.thresholds has {len(self.multilabel.thresholds)} values for "
                             f"{len(self.labels)} labels")  # fmt: skip
        return self

    @field_validator("labels")
    @classmethod
    def _unique(cls, labels: list[str]) -> list[str]:
        seen: set[str] = set()
        for label in labels:
            if label in seen:
                raise ValueError(f"label '{label}' appears twice")
            seen.add(label)
        return labels


class ModelFileMetadata(_CommonMetadata):
    """The metadata of an ``.imgclf`` file."""

    format: Literal["imgclf"]
    format_version: Annotated[int, Field(ge=1, le=FORMAT_VERSION)]
    timm_name: _Name
    num_features: Annotated[int, Field(ge=1, le=MAX_FEATURES)]
    weights_source: str | None = None
    training: dict[str, Any] | None = None
    history: list[dict[str, Any]] | None = None
    skipped: list[dict[str, Any]] | None = None
    extraction: dict[str, Any] | None = None
    stored_features: StoredFeaturesSpec | None = None
    trained_on_from: TrainedOnFrom | None = None

    @model_validator(mode="after")
    def _multilabel_version(self) -> ModelFileMetadata:
        if self.multilabel is not None and self.format_version < MULTILABEL_FORMAT_VERSION:
            raise ValueError(f"a multi-label model is format {MULTILABEL_FORMAT_VERSION}, not {self.format_version}")
        return self

    @field_validator("timm_name")
    @classmethod
    def _registry_name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
            raise ValueError("not a timm model name (letters, digits, '_', '.', '-'); a model file never names "
                             "a download source")  # fmt: skip
        return name


class OnnxMetadata(_CommonMetadata):
    """The ``imgclf`` metadata property of an exported ONNX file."""

    timm_name: str | None = None
    format_version: Annotated[int, Field(ge=1, le=FORMAT_VERSION)] | None = None
    opset: int | None = None
    quantized: Literal["int8"] | None = None
    precision: Literal["fp32", "int8"] = "fp32"  # int8: the calibrated static graph
    input: dict[str, Any] | None = None
    output: dict[str, Any] | None = None


def _first_non_finite(value: Any, where: str = "") -> str | None:
    """The path of the first NaN or infinity in parsed JSON (JSON has neither; Python's json writes them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return where or "(top level)"
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _first_non_finite(item, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def without_non_finite(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None: what imgclf writes always loads again."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: without_non_finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_non_finite(v) for v in value]
    return value


def _describe(error: dict) -> str:
    where = ".".join(str(p) for p in error["loc"])
    if error["type"] == "missing":
        return f"model file is incomplete, missing {where}"
    got = repr(error.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    msg = error["msg"].replace("Value error, ", "")
    return f"metadata field '{where or '(top level)'}' is {got}: {msg}"


def parse_metadata(raw: str | bytes, path: object, kind: Literal["imgclf", "onnx"]) -> dict[str, Any]:
    """The metadata JSON ``raw`` of the file ``path``, checked; raises :class:`ModelFileError`.

    Returns the parsed JSON (every field, including unknown ones), safe to build from.
    """
    try:
        config = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ModelFileError(f"{path}: imgclf metadata is not valid JSON; the file is corrupt") from None
    if not isinstance(config, dict):
        raise ModelFileError(f"{path}: imgclf metadata is not a JSON object; the file is corrupt")
    version = config.get("format_version")
    if type(version) is int and version > FORMAT_VERSION:
        raise ModelFileError(f"{path}: made by a newer imgclf (format {version}); upgrade imgclf")
    bad = _first_non_finite(config)
    if bad:
        raise ModelFileError(f"{path}: metadata field '{bad}' is not a finite number")
    schema = ModelFileMetadata if kind == "imgclf" else OnnxMetadata
    try:
        schema.model_validate_json(raw, strict=True)
    except ValidationError as e:
        raise ModelFileError(f"{path}: {_describe(e.errors()[0])}") from None
    except RecursionError:
        raise ModelFileError(f"{path}: imgclf metadata is nested too deeply; the file is corrupt") from None
    return config


def preprocessing_of(config: dict[str, Any]) -> Preprocessing:
    """The :class:`Preprocessing` of metadata already checked by :func:`parse_metadata`."""
    return PreprocessingSpec.model_validate(config["preprocessing"], strict=False).build()
