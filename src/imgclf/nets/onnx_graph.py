"""Turning a torch module into an ONNX graph, shared by the fast engine and export.

TF-trained EfficientNets use "same" padding, which timm computes from the
input shape on every call (``Conv2dSame``). For our fixed input size the
padding is a constant, so the graph gets plain Pad+Conv nodes instead of
shape arithmetic; ONNX Runtime then fuses them and runs about 2x faster.
"""

from __future__ import annotations

import copy
import io
import math
import warnings

import torch

DEFAULT_OPSET = 18


def input_hw(input_size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) of an input given as a square's side or as (height, width)."""
    return (input_size, input_size) if isinstance(input_size, int) else (int(input_size[0]), int(input_size[1]))


def with_static_padding(module: torch.nn.Module, input_size: int | tuple[int, int]) -> torch.nn.Module:
    """A copy of ``module`` whose dynamic "same" convolutions have fixed padding.

    Exact for inputs of ``input_size`` (a square's side, or (height, width)), which is all
    our preprocessing produces. Modules without such convolutions come back as a copy.
    """
    from timm.layers import Conv2dSame

    module = copy.deepcopy(module).eval().to(memory_format=torch.contiguous_format)
    dynamic = {name: m for name, m in module.named_modules() if isinstance(m, Conv2dSame)}
    if not dynamic:
        return module
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _m, inp, name=name: sizes.__setitem__(name, tuple(inp[0].shape[-2:])))
        for name, m in dynamic.items()
    ]
    device = next(module.parameters()).device
    with torch.no_grad():
        module(torch.zeros(1, 3, *input_hw(input_size), device=device))
    for hook in hooks:
        hook.remove()
    for name, conv in dynamic.items():
        pads = []
        for size, k, s, d in zip(sizes[name], conv.kernel_size, conv.stride, conv.dilation):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        plain = torch.nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0,
                                conv.dilation, conv.groups, conv.bias is not None).to(device)  # fmt: skip
        plain.load_state_dict(conv.state_dict())
        (top, bottom), (left, right) = pads
        replacement = torch.nn.Sequential(torch.nn.ZeroPad2d((left, right, top, bottom)), plain)
        parent_name, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, attr, replacement)
    return module


def to_onnx_bytes(
    module: torch.nn.Module,
    input_size: int | tuple[int, int],
    *,
    input_name: str = "input",
    output_name: str | tuple[str, ...] = "output",
    opset: int = DEFAULT_OPSET,
) -> bytes:
    """The ONNX graph of ``module`` for float32 (N, 3, height, width) input (``input_size``: a
    square's side or (height, width)), N dynamic; ``output_name`` names its output, or each of
    its outputs (a tuple)."""
    names = (output_name,) if isinstance(output_name, str) else tuple(output_name)
    module = with_static_padding(module, input_size).cpu()
    example = torch.zeros(1, 3, *input_hw(input_size))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (example,), buffer, input_names=[input_name], output_names=list(names),
            dynamic_axes={input_name: {0: "batch"}, **{n: {0: "batch"} for n in names}}, opset_version=opset,
            dynamo=False,
        )  # fmt: skip
    return _with_fixed_dims(buffer.getvalue(), module, example)


def _with_fixed_dims(graph_bytes: bytes, module: torch.nn.Module, example: torch.Tensor) -> bytes:
    """The graph with every output's dimensions but the batch given as numbers: the exporter's
    shape inference named a class-map axis after the batch (``['batch', 5, 'batch', ...]``),
    which tells a reader of the declared shapes that the map's height is the batch size. Without
    the ``onnx`` package (an engine built for training, not an export) the graph is left as is."""
    try:
        import onnx
    except ImportError:
        return graph_bytes

    with torch.no_grad():
        outputs = module(example)
    outputs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
    graph = onnx.load_from_string(graph_bytes)
    for declared, output in zip(graph.graph.output, outputs):
        for axis, size in enumerate(output.shape[1:], 1):
            dim = declared.type.tensor_type.shape.dim[axis]
            dim.Clear()
            dim.dim_value = int(size)
    return graph.SerializeToString()
