"""Which engine runs the frozen network: picked by measurement, not taste.

On a CPU, ONNX Runtime runs EfficientNet-Lite0 about 3x faster than eager
PyTorch (see benchmarks/throughput.py), so when onnxruntime is installed the
backbone is exported once per process (about a second) and run there. On a
GPU, or without onnxruntime, eager PyTorch in channels-last layout is used.
Both give the same features within 1e-4 (tests/test_engine.py).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from imgclf.errors import MissingDependencyError

ENGINES = ("auto", "torch", "onnxruntime")


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError("ONNX prediction needs onnxruntime: pip install 'imgclf[runtime]'") from None
    return onnxruntime


class OnnxSession:
    """An ONNX Runtime session on the CPU: float32 batch in, first output out."""

    name = "onnxruntime"

    def __init__(self, model: bytes | str | Path, threads: int | None = None):
        ort = _ort()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or min(os.cpu_count() or 1, 8)
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        source = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, arrays: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(arrays, dtype=np.float32)})[0]

    def metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)


class TorchEngine:
    """Eager PyTorch, channels-last, inference mode."""

    name = "torch"

    def __init__(self, module, device: str = "cpu"):
        import torch

        self.module = module.eval().to(device).to(memory_format=torch.channels_last)
        self.device = device

    def __call__(self, arrays: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(arrays)).to(self.device)
            return self.module(x.contiguous(memory_format=torch.channels_last)).float().cpu().numpy()


def create_engine(module, input_size: int, device: str = "cpu", engine: str = "auto", threads: int | None = None):
    """An engine computing ``module`` on preprocessed (N, 3, size, size) arrays.

    ``threads``: ONNX Runtime's threads (default: the CPUs, at most 8); a Ray actor gives its own CPUs.
    """
    from imgclf.errors import OptionError

    if engine not in ENGINES:
        raise OptionError(f"engine must be one of {', '.join(ENGINES)}, got '{engine}'")
    use_ort = engine == "onnxruntime" or (engine == "auto" and device == "cpu" and onnxruntime_available())
    if not use_ort:
        return TorchEngine(module, device)
    from imgclf.nets.engines import OnnxSession
    from imgclf.nets.onnx_graph import to_onnx_bytes

    return OnnxSession(to_onnx_bytes(module, input_size), threads=threads)
