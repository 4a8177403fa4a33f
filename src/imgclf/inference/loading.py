"""Loading a model file of either kind, told apart by its first bytes.

An imgclf model file is a safetensors file; an exported model is an ONNX
protobuf. The suffix is never trusted: ``model.bak`` loads, and an ``.onnx``
name on a safetensors file does not send it to the wrong parser.
"""

from __future__ import annotations

from pathlib import Path

from imgclf.errors import ModelFileError
from imgclf.inference.predictor import Predictor


def load_model(
    path: str | Path,
    device: str = "cpu",
    engine: str = "auto",
    *,
    threads: int | None = None,
    precision: str = "auto",
    images: int | None = None,
) -> Predictor:
    """Any imgclf model file: a trained ``.imgclf`` model (an :class:`ImageClassifier`,
    needs torch) or an exported ONNX file (an :class:`OnnxClassifier`, torch-free).

    Both answer ``predict``, ``predict_batch`` and ``evaluate``. ``engine`` (auto,
    onnxruntime, openvino, torch) and ``precision`` (auto, fp32, bf16, int8) are decided
    by :func:`imgclf.nets.engines.choose_engine`, the one place for every command;
    ``device`` applies to the torch model. ``threads``: threads of the network's
    engine; default: the CPUs, at most 8. ``images``: the job's size, if known.
    """
    from imgclf.data.uris import local_model_file
    from imgclf.filetypes import WHAT_IT_IS, sniff

    if not isinstance(path, (str, Path)):
        raise ModelFileError(f"load_model takes the model file's path, got {type(path).__name__}")
    path = local_model_file(path)  # a URI is fetched once
    if path.is_dir():
        raise ModelFileError(f"{path}: is a folder, not a model file")
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    try:
        kind = sniff(path)
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read model file ({e.strerror or e})") from None
    if kind == "onnx":
        from imgclf.inference.runtime import load_onnx_model

        return load_onnx_model(path, threads=threads, engine=engine, precision=precision, images=images)
    if kind != "safetensors":
        what = "ONNX model" if path.suffix.lower() == ".onnx" else "imgclf model file"  # wording only
        raise ModelFileError(f"{path}: not a readable {what} ({WHAT_IT_IS[kind]}); expected an imgclf model or an "
                             "exported ONNX file")  # fmt: skip
    from imgclf.inference.model import load_model as load_imgclf_model

    model = load_imgclf_model(path, device=device, engine=engine, precision=precision)
    model.threads = threads
    model.job_size = images
    model.engine_choice()  # a bad engine or precision is refused at load, before any image
    return model


#: The name the CLI and the server have always used.
load_predictor = load_model
