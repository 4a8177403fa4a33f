"""The pretrained backbone a training run uses, built only when something needs it.

Building it means importing torch's vision stack and timm (about 2.5 s on two cores)
and exporting a graph for the feature engine (1.5 to 2 s). A run whose features are
all in the workspace needs neither: it trains the head on cached vectors and saves
the model from the backbone's tensors, kept beside those features the first time the
network is built (:func:`imgclf.nets.workspace.backbone_file`). So the second
``imgclf train`` on the same photos skips the network entirely.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from imgclf.atomic import atomic_path
from imgclf.errors import ImgclfError
from imgclf.nets.archs import Architecture, create_backbone, weights_source
from imgclf.nets.workspace import backbone_file


def expected_weights_source(arch: Architecture, weights: str | Path | None) -> str:
    """Where :func:`create_backbone` will take the weights from (it says so again when it builds)."""
    if weights is not None:
        return f"file {weights}"
    return weights_source(arch) or "timm hub"


class DeferredEngine:
    """A feature engine built on its first batch: never built if every image is cached."""

    def __init__(self, build):
        self._build = build
        self.built = None

    def __call__(self, arrays):
        if self.built is None:
            self.built = self._build()
        return self.built(arrays)

    @property
    def name(self) -> str:
        return self.built.name if self.built is not None else "none (all features cached)"


class PretrainedNetwork:
    """The frozen backbone of one run (``arch`` with ``weights``), its feature engine, and
    its tensors for the model file; each made on first need."""

    def __init__(self, arch: Architecture, weights, device: str, engine: str, input_size: int):
        self.arch, self.weights, self.device, self.engine_name = arch, weights, device, engine
        self.input_size = input_size
        self.source = expected_weights_source(arch, weights)
        self.module = None
        self.tensors_file: Path | None = None  # set once the feature cache's folder is known
        self.tensors_writable = False

    @property
    def cache_key(self) -> str:
        return f"{self.arch.name}|{self.arch.timm_name}|{self.source}"

    def keep_tensors_in(self, folder: Path | None, writable: bool) -> None:
        self.tensors_file = None if folder is None else backbone_file(folder)
        self.tensors_writable = writable

    def backbone(self):
        """The pretrained network (built once), its tensors kept in the workspace for next time."""
        if self.module is None:
            module, self.source = create_backbone(self.arch, self.weights)
            self.module = module.to(self.device)
            self._keep_tensors()
        return self.module

    def feature_engine(self) -> DeferredEngine:
        from imgclf.nets.engines import create_engine

        return DeferredEngine(lambda: create_engine(self.backbone(), self.input_size, self.device, self.engine_name))

    def for_model(self):
        """What the model holds: the built network, else the kept tensors (no network built),
        else the network after all."""
        if self.module is None and self.tensors_file is not None and self.tensors_file.is_file():
            try:
                from safetensors.torch import load_file

                return load_file(str(self.tensors_file))
            except Exception:  # a damaged file: build the network instead
                pass
        return self.backbone()

    def _keep_tensors(self) -> None:
        if self.tensors_file is None or not self.tensors_writable or self.tensors_file.is_file():
            return
        try:
            from safetensors.torch import save_file

            state = {k: v.detach().to("cpu").contiguous() for k, v in self.module.state_dict().items()}
            with atomic_path(self.tensors_file, "backbone tensors") as tmp:
                save_file(state, tmp)
        except (ImgclfError, OSError) as e:
            warnings.warn(f"workspace: cannot keep the backbone's tensors ({e}); the next run builds it again",
                          stacklevel=3)  # fmt: skip
