"""An imgclf model file as an MLflow pyfunc model (MLflow's "custom Python model" convention).

:func:`log_model` logs a saved model file as the artifact of a ``python_function`` model
with a signature, so that ``mlflow.pyfunc.load_model("runs:/<id>/model").predict(df)``
scores a DataFrame and ``mlflow models serve`` serves it. Each row of ``df`` gives an
image in one of two columns:

- ``path``: a file path (str), or
- ``image``: the encoded image (bytes: JPEG, PNG, ...).

The answer is a DataFrame with one row per input row: the prediction row's columns
(:mod:`imgclf.rows`) but the path: ``label``, ``probability``, ``top_labels`` and
``top_probabilities`` (the ``top_k`` parameter's most likely labels, default 1), and ``error``
(None, or why that row's image could not be scored; the other rows are still scored),
the same answers as ``imgclf predict`` gives for the same model file.

``imgclf predict models:/NAME/1`` finds the model file in the downloaded model
(``imgclf.data.uris``). MLflow is imported only here, in ``imgclf.data.uris`` for
``models:/`` and ``runs:/`` paths, and in ``imgclf.training.tracking``.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import pandas as pd  # MLflow's own dependency

from imgclf import rows
from imgclf.data.uris import MLFLOW_MODEL_ARTIFACT as ARTIFACT  # the model file's key among the artifacts
from imgclf.options import TOP_K

#: Where the model is logged inside a run (``runs:/<id>/model``).
ARTIFACT_PATH = "model"


def signature():
    """Input: ``path`` (string) or ``image`` (bytes), one of them per row, and the parameter
    ``top_k``; output: the prediction row's columns but the path (:mod:`imgclf.rows`)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    types = {"text": "string", "number": "double", "flag": "boolean", "texts": Array("string"), "numbers": Array("double")}
    inputs = Schema([ColSpec("string", "path", required=False), ColSpec("binary", "image", required=False)])
    outputs = Schema([ColSpec(types[kind], name, required=False)  # null where an image could not be scored
                      for name, kind in rows.TABLE_COLUMNS if name not in rows.NAME_COLUMNS])  # fmt: skip
    params = ParamSchema([ParamSpec("top_k", "long", TOP_K)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


class ImgclfPythonModel(mlflow.pyfunc.PythonModel):
    """The pyfunc wrapper: loads the model file once (``load_context``), scores DataFrames."""

    def load_context(self, context) -> None:
        from imgclf.inference.loading import load_model

        self.model = load_model(context.artifacts[ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from imgclf.errors import DataError, ImageDecodeError

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "path" not in frame.columns and "image" not in frame.columns:
            raise DataError("give the images in a column 'path' (file paths) or 'image' (encoded bytes)")
        items = []
        for i in range(len(frame)):
            data = frame["image"].iloc[i] if "image" in frame.columns else None
            path = frame["path"].iloc[i] if "path" in frame.columns else None
            if isinstance(data, (bytes, bytearray, memoryview)):
                items.append((bytes(data), str(path) if isinstance(path, str) else f"<row {i}>"))
            elif isinstance(path, str) and path:
                items.append((path, path))
            else:
                items.append((b"", f"<row {i}>"))  # nothing given: an error row, like an empty file
        top_k = int((params or {}).get("top_k", TOP_K))
        self.model.job_size = len(items)
        results = []
        for name, outcome in self.model.iter_predictions(items):
            if isinstance(outcome, ImageDecodeError):
                results.append(rows.failed(name, str(outcome)))
            else:
                results.append(outcome.row(name, top_k))
        return pd.DataFrame(rows.columns(results, with_name=False))


def pip_requirements() -> list[str]:
    """What the model needs where it is served: imgclf itself and the libraries it was trained with."""
    from importlib import metadata

    wanted = []
    for name in ("imgclf", "torch", "torchvision", "timm", "safetensors", "numpy", "pillow", "pydantic", "pandas",
                 "mlflow"):  # fmt: skip
        try:
            wanted.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return wanted


#: MLflow's "models from code": the file that defines the model when MLflow loads it (no pickle).
CODE = Path(__file__).with_name("mlflow_code.py")


def log_model(model_file: str | Path, registered_model_name: str | None = None):
    """Log ``model_file`` to the active run as a pyfunc model at ``model``; returns MLflow's ModelInfo.

    The model is defined by code (:data:`CODE`, MLflow's models-from-code), not a pickle; no
    input example is logged (an image path would not travel, image bytes would bloat the run)."""
    import os
    import warnings

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        return mlflow.pyfunc.log_model(
            name=ARTIFACT_PATH, python_model=str(CODE), artifacts={ARTIFACT: str(model_file)},
            signature=signature(), pip_requirements=pip_requirements(), registered_model_name=registered_model_name,
        )  # fmt: skip
