"""Export a trained model to ONNX: the portable, native model.

The whole network (backbone, head, softmax) becomes one graph with a dynamic
batch axis. Labels, architecture and preprocessing go into the ONNX metadata
(key ``imgclf``), so the file alone is enough to use the model from any
language. Input: float32 NCHW ``(N, 3, S, S)``, RGB, resized and
centre-cropped as the metadata says, then ``(pixel / 255 - mean) / std``.
Output ``probabilities``: float32 ``(N, classes)``, in metadata label order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from imgclf.atomic import atomic_path
from imgclf.errors import ModelFileError, OptionError
from imgclf.inference.runtime import METADATA_KEY

if TYPE_CHECKING:
    from imgclf.inference.model import ImageClassifier

INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"


def export_onnx(model: ImageClassifier, path: str | Path, *, quantize: str | None = None) -> Path:
    """Write ``model`` as an ONNX file at ``path`` (atomically); returns the path.

    ``quantize="int8"`` writes dynamically quantized int8 weights instead.
    """
    import onnx

    from imgclf.nets.onnx_graph import DEFAULT_OPSET, to_onnx_bytes

    if quantize not in (None, "int8"):
        raise OptionError(f"quantize must be 'int8' or none, got '{quantize}'")
    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"{path}: is a folder; give a file name ending in .onnx")
    graph = onnx.load_from_string(
        to_onnx_bytes(
            model.network().cpu(), model.preprocessing.input_size, input_name=INPUT_NAME, output_name=OUTPUT_NAME
        )  # fmt: skip
    )
    config = {
        "labels": model.labels,
        "arch": model.arch,
        "timm_name": model.timm_name,
        "preprocessing": model.preprocessing.to_dict(),
        "input": {
            "name": INPUT_NAME,
            "layout": "NCHW",
            "dtype": "float32",
            "channels": "RGB",
            "range": "(pixel / 255 - mean) / std",
        },  # fmt: skip
        "output": {"name": OUTPUT_NAME, "meaning": "softmax probabilities in label order"},
        "metrics": model.info.get("metrics"),
        "versions": model.info.get("versions"),
        "opset": DEFAULT_OPSET,
        "quantized": quantize,
    }
    del graph.metadata_props[:]
    entry = graph.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(config)
    graph.producer_name = "imgclf"
    graph.doc_string = f"imgclf image classifier ({model.arch}); labels: {', '.join(model.labels)}"
    with atomic_path(path, "ONNX file") as tmp:
        onnx.save(graph, tmp)
        if quantize == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(tmp, tmp, weight_type=QuantType.QUInt8)
            quantized = onnx.load(tmp)
            if not any(p.key == METADATA_KEY for p in quantized.metadata_props):
                quantized.metadata_props.extend(graph.metadata_props)
                onnx.save(quantized, tmp)
    return path
