"""Loading a model file of either kind: an imgclf model or an exported ONNX file."""

from __future__ import annotations

from pathlib import Path

from imgclf.inference.predictor import Predictor


def load_predictor(path: str | Path, device: str = "cpu", *, threads: int | None = None) -> Predictor:
    """An imgclf model file, or an exported ``.onnx`` file (the torch-free path).

    ``threads``: threads of the network's engine (ONNX Runtime); default: the CPUs, at most 8.
    """
    if str(path).lower().endswith(".onnx"):
        from imgclf.inference.runtime import load_onnx_model

        return load_onnx_model(path, threads=threads)
    from imgclf.inference.model import load_model

    model = load_model(path, device=device)
    model.threads = threads
    return model
