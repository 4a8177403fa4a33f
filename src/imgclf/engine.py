"""Which engine runs the frozen network: picked by measurement, not taste.

On a CPU, ONNX Runtime runs EfficientNet-Lite0 about 3x faster than eager
PyTorch (see benchmarks/throughput.py), so when onnxruntime is installed the
backbone is exported once per process (about a second) and run there. On a
GPU, or without onnxruntime, eager PyTorch in channels-last layout is used.
Both give the same features within 1e-4 (tests/test_engine.py).
"""

from __future__ import annotations

import importlib.util

import numpy as np

ENGINES = ("auto", "torch", "onnxruntime")


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


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


def create_engine(module, input_size: int, device: str = "cpu", engine: str = "auto"):
    """An engine computing ``module`` on preprocessed (N, 3, size, size) arrays."""
    from imgclf.errors import OptionError

    if engine not in ENGINES:
        raise OptionError(f"engine must be one of {', '.join(ENGINES)}, got '{engine}'")
    use_ort = engine == "onnxruntime" or (engine == "auto" and device == "cpu" and onnxruntime_available())
    if not use_ort:
        return TorchEngine(module, device)
    from imgclf.onnx_graph import to_onnx_bytes
    from imgclf.runtime import OnnxSession

    return OnnxSession(to_onnx_bytes(module, input_size))
