"""URIs (``s3://``, ``gs://``, ``az://``, ``memory://``, ``file://``) through fsspec, and
MLflow's ``models:/NAME/VERSION`` and ``runs:/RUN_ID/model`` for model files.

Images, manifests, results folders and model files may all live in object storage;
every module that reads or writes one asks here, so a missing filesystem package is
the same one line everywhere. The endpoint of an S3-compatible server is set the
usual way: ``AWS_ENDPOINT_URL`` (and the usual AWS credentials variables).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from imgclf.errors import DataError, ImageDecodeError, MissingDependencyError, ModelFileError
from imgclf.options import install_hint


def is_uri(path: str | Path) -> bool:
    """``scheme://...`` (but not a Windows drive such as ``C:\\``)."""
    scheme, sep, _ = str(path).partition("://")
    return bool(sep) and len(scheme) > 1 and scheme.replace("+", "").replace("-", "").isalnum()


def as_local(path: str | Path) -> str | Path:
    """A ``file://`` URI as the local path it names (written as given, it became a folder named
    ``file:``); anything else as it is."""
    text = str(path)
    if not text.startswith("file://"):
        return path
    from urllib.parse import unquote, urlsplit

    return unquote(urlsplit(text).path)


def is_remote(path: str | Path) -> bool:
    """A URI of a filesystem other than the local one (``file://`` is local)."""
    return is_uri(path) and not str(path).startswith("file://")


def filesystem(uri: str):
    """The fsspec filesystem and bare path for ``uri``; a one-line error naming the
    package to install when its filesystem is missing."""
    try:
        import fsspec
    except ImportError:
        raise MissingDependencyError(f"{uri}: reading URIs needs fsspec: {install_hint('batch')}") from None
    from fsspec.registry import known_implementations

    scheme = uri.split("://", 1)[0]
    if scheme == "file":  # percent-decoded as a file URI is written (fsspec keeps %20 as it is), as as_local does
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem(), str(as_local(uri))
    try:
        return fsspec.core.url_to_fs(uri)
    except ImportError:
        cls = known_implementations.get(scheme, {}).get("class", "")
        package = cls.split(".", 1)[0] or f"the fsspec filesystem for {scheme}://"
        raise MissingDependencyError(
            f"{uri}: {scheme}:// needs the '{package}' package: pip install {package}"
        ) from None
    except ValueError as e:
        raise DataError(f"{uri}: {e}; fsspec knows no filesystem for {scheme}://") from None


def read_image_bytes(path: str) -> bytes:
    """The bytes of one image, local or a URI; an unreadable one is an
    :class:`ImageDecodeError` naming it (so it becomes an error row, not a crash)."""
    try:
        if is_uri(path):
            fs, bare = filesystem(path)
            with fs.open(bare, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except MissingDependencyError as e:
        raise ImageDecodeError(str(e)) from None
    except OSError as e:
        raise ImageDecodeError(f"{path}: cannot read file ({e.strerror or e})") from None
    except Exception as e:  # a remote filesystem's own error types
        raise ImageDecodeError(f"{path}: cannot read file ({type(e).__name__}: {e})") from None


_fetched: dict[str, Path] = {}

#: MLflow's model URIs: the registry (``models:/NAME/VERSION``, ``models:/NAME@alias``) and runs.
MLFLOW_SCHEMES = ("models:/", "runs:/")
#: The key of the model file among the artifacts of a pyfunc model imgclf logged.
MLFLOW_MODEL_ARTIFACT = "model_file"


def is_mlflow_uri(path: str | Path) -> bool:
    """``models:/...`` or ``runs:/...``: a model in MLflow's registry or in a run."""
    return str(path).startswith(MLFLOW_SCHEMES)


def local_model_file(path: str | Path) -> Path:
    """A model file's local path: itself, or for a URI (or an MLflow model URI) a private
    copy fetched once per process."""
    text = str(path)
    if text in _fetched and _fetched[text].is_file():
        return _fetched[text]
    if is_mlflow_uri(text):
        _fetched[text] = _mlflow_model_file(text)
        return _fetched[text]
    if not is_uri(path):
        return Path(path)
    fs, bare = filesystem(text)
    try:
        data = fs.cat_file(bare)
    except FileNotFoundError:
        raise ModelFileError(f"{text}: model file not found") from None
    except Exception as e:  # each filesystem raises its own types
        raise ModelFileError(f"{text}: cannot read model file ({type(e).__name__}: {e})") from None
    folder = Path(tempfile.mkdtemp(prefix="imgclf-model-"))
    local = folder / (os.path.basename(bare.rstrip("/")) or "model")
    local.write_bytes(data)
    _fetched[text] = local
    return local


def _mlflow_model_file(uri: str) -> Path:
    """Download an MLflow model (from ``MLFLOW_TRACKING_URI``'s server) and find its model file:
    the ``model_file`` artifact of the pyfunc model imgclf logs, or the file itself when the
    URI names one (``runs:/ID/some/file.imgclf``)."""
    try:
        import mlflow.artifacts
        from mlflow.models import Model
    except ImportError:
        raise MissingDependencyError(f"{uri}: MLflow model URIs need MLflow: {install_hint('mlflow')}") from None
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    folder = Path(tempfile.mkdtemp(prefix="imgclf-model-"))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(folder)))
    except Exception as e:  # MlflowException (not found, server down) and the transport's own errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFileError(f"{uri}: cannot fetch the model from MLflow ({first})") from None
    if local.is_file():
        return local
    try:
        flavor = Model.load(str(local / "MLmodel")).flavors["python_function"]
        return local / flavor["artifacts"][MLFLOW_MODEL_ARTIFACT]["path"]
    except (OSError, KeyError, TypeError) as e:
        raise ModelFileError(
            f"{uri}: not a model logged by imgclf (no {MLFLOW_MODEL_ARTIFACT} artifact: {e})"
        ) from None
