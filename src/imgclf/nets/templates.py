"""Graph templates: the backbone's ONNX graph without its weights, shipped with imgclf.

The first ``imgclf train`` on new photos needs the pretrained network's features. Building
the network means importing timm (2.3 s on two cores, most of it torchvision and
``torch._dynamo``) and exporting it to ONNX (1.5 to 2 s), about half the main job. For the
architectures whose weights come from a package (EfficientNet-Lite0/1/2), imgclf ships the
exported graph of the backbone with its weights left out (about 90 kB): ONNX Runtime gets
them from the weights file at session start (``add_external_initializers``), so the pass
runs without timm and without an export. The graph keeps batch norm unfused (ONNX
Runtime fuses it when the session starts), so every weight is a named tensor of the
network's state dict; the side file ``<arch>.json`` maps initializer names to state-dict
keys and lists the state dict the model file must hold.

Features from a template equal those of the exported network to about 1e-5
(``tests/test_templates.py``). Anything else (another architecture, OpenVINO, a GPU, a
weights file that does not fit) builds the network as before. ``python -m
imgclf.nets.templates`` rebuilds the templates (needs timm); the test checks the shipped
ones against the network they stand for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf.nets.archs import ARCHITECTURES, Architecture, load_state_dict_file, lukemelas_to_timm

GRAPHS = Path(__file__).parent / "graphs"


@dataclass(frozen=True)
class Template:
    """A shipped graph and what it needs."""

    arch: str
    graph: Path
    initializers: dict[str, str]  # initializer name -> state-dict key
    state: dict[str, list[int]]  # the backbone's full state dict: key -> shape
    stages: list[int]  # blocks per stage (to rename lukemelas-style weights)
    input_size: int


def template_for(arch: Architecture) -> Template | None:
    """The shipped template for ``arch``, or None."""
    side = GRAPHS / f"{arch.name}.json"
    graph = GRAPHS / f"{arch.name}.onnx"
    if not (side.is_file() and graph.is_file()):
        return None
    meta = json.loads(side.read_text())
    return Template(arch.name, graph, meta["initializers"], meta["state"], meta["stages"], meta["input_size"])


def state_from_file(template: Template, path: str | Path) -> dict | None:
    """The backbone's state dict (timm's names, torch tensors) from a weights file, or None
    when the file does not fit the template (then the network is built as usual)."""
    state = load_state_dict_file(path)
    if any(k.startswith("_blocks.") for k in state):
        state = lukemelas_to_timm(state, template.stages)
    state = {k: v for k, v in state.items() if k in template.state}
    if set(state) != set(template.state) or any(list(v.shape) != template.state[k] for k, v in state.items()):
        return None
    return state


def template_engine(template: Template, state: dict, threads: int | None = None):
    """An ONNX Runtime engine running the template with the weights in ``state``."""
    from imgclf.nets.engines import OnnxSession

    weights = {name: state[key].detach().cpu().numpy().astype(np.float32, copy=False)
               for name, key in template.initializers.items()}  # fmt: skip
    return OnnxSession(template.graph.read_bytes(), threads, initializers=weights)


def build_template(arch: Architecture, out: Path = GRAPHS) -> Path:
    """Export ``arch``'s backbone as a template into ``out`` (needs timm and onnx)."""
    import io
    import warnings

    import onnx
    import torch
    from onnx import TensorProto

    from imgclf.nets.archs import create_backbone, preprocessing_for
    from imgclf.nets.onnx_graph import DEFAULT_OPSET, with_static_padding

    size = preprocessing_for(arch).input_size
    backbone, _ = create_backbone(arch)
    static = with_static_padding(backbone, size).cpu()
    renamed = {k: k for k in backbone.state_dict()}
    for key in static.state_dict():  # a padded convolution became Sequential(pad, conv): "x.1.weight" is "x.weight"
        parts = key.split(".")
        for i in range(len(parts) - 1, 0, -1):
            if parts[i] == "1" and ".".join(parts[:i] + parts[i + 1 :]) in renamed:
                renamed[key] = ".".join(parts[:i] + parts[i + 1 :])
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(static, (torch.zeros(1, 3, size, size),), buffer, input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                          opset_version=DEFAULT_OPSET, dynamo=False, do_constant_folding=False)  # fmt: skip
    graph = onnx.load_from_string(buffer.getvalue())
    mapping = {}
    for init in graph.graph.initializer:
        mapping[init.name] = renamed[init.name]
        init.ClearField("raw_data")
        init.ClearField("float_data")
        init.data_location = TensorProto.EXTERNAL
        entry = init.external_data.add()
        entry.key, entry.value = "location", "weights-given-at-session-start"
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(graph, str(out / f"{arch.name}.onnx"))
    meta = {"arch": arch.name, "input_size": size, "initializers": mapping,
            "state": {k: list(v.shape) for k, v in backbone.state_dict().items()},
            "stages": [len(stage) for stage in backbone.blocks], "opset": DEFAULT_OPSET,
            "built_with": {"torch": torch.__version__}}  # fmt: skip
    (out / f"{arch.name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out / f"{arch.name}.onnx"


if __name__ == "__main__":
    for row in ARCHITECTURES.values():
        if row.weights_package:
            print(build_template(row))
