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

    def __init__(self, arch: Architecture, weights, device: str, engine: str, input_size: int | tuple[int, int]):
        self.arch, self.weights, self.device, self.engine_name = arch, weights, device, engine
        self.input_size = input_size
        self.source = expected_weights_source(arch, weights)
        self.module = None
        self.state: dict | None = None  # the backbone's tensors when a graph template ran it
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
            self._keep_tensors(self.module.state_dict())
        return self.module

    def feature_engine(self) -> DeferredEngine:
        """The engine of the feature pass, built on the first image not in the cache: the
        shipped graph template with the weights file's tensors where one fits (no timm, no
        export), else the network."""
        from imgclf.nets.engines import create_engine

        def build():
            engine = self._template_engine()
            if engine is None:
                engine = create_engine(self.backbone(), self.input_size, self.device, self.engine_name)
            return engine

        return DeferredEngine(build)

    def _template_engine(self):
        from imgclf.errors import WeightsUnavailableError
        from imgclf.nets.archs import package_weights_file
        from imgclf.nets.engines import choose_engine
        from imgclf.nets.templates import state_from_file, template_engine, template_for

        template = template_for(self.arch)
        if template is None or self.input_size not in (template.input_size, (template.input_size,) * 2):
            return None
        choice = choose_engine(self.engine_name, "fp32", device=self.device)
        path = self.weights if self.weights is not None else package_weights_file(self.arch)
        if choice.engine != "onnxruntime" or path is None:
            return None
        try:
            state = state_from_file(template, path)
        except WeightsUnavailableError:
            return None  # building the network says what is wrong with the file
        if state is None:
            return None
        engine = template_engine(template, state)
        engine.choice = choice
        self.state = state
        self._keep_tensors(state)
        return engine

    def for_model(self):
        """What the model holds: the built network, else the tensors a template ran with,
        else the kept tensors (no network built), else the network after all."""
        if self.module is None and self.state is not None:
            return self.state
        if self.module is None and self.tensors_file is not None and self.tensors_file.is_file():
            try:
                from safetensors.torch import load_file

                return load_file(str(self.tensors_file))
            except Exception:  # a damaged file: build the network instead
                pass
        return self.backbone()

    def _keep_tensors(self, state: dict) -> None:
        if self.tensors_file is None or not self.tensors_writable or self.tensors_file.is_file():
            return
        try:
            from safetensors.torch import save_file

            state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
            with atomic_path(self.tensors_file, "backbone tensors") as tmp:
                save_file(state, tmp)
        except (ImgclfError, OSError) as e:
            warnings.warn(f"workspace: cannot keep the backbone's tensors ({e}); the next run builds it again",
                          stacklevel=3)  # fmt: skip
