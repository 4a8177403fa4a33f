"""A trained classifier and its one-file format.

The file is a safetensors file (tensors only, never pickle, so loading an
untrusted model cannot run code). The backbone's tensors are stored under
``backbone.``, the head's under ``head.``, and everything else a user needs
(labels, architecture, preprocessing, training options, metrics, library
versions) is JSON in the safetensors metadata under ``imgclf``. A model calibrated
for int8 also carries its int8 graph (an ONNX QDQ graph, data, not code) as the
uint8 tensor ``int8.onnx``, so it is calibrated once and travels with the file
(to Ray actors, Spark executors, another machine). A head-only model also keeps its
training images' pooled features under ``stored.`` (:mod:`imgclf.inference.stored`), read
only by ``train --from``: prediction never loads them. A model trained since the
unknown-input detector exists carries its bank of training features as
``unknown.bank`` and its threshold under the metadata's ``unknown``
(:mod:`imgclf.inference.unknown`); an older file loads without one, and says so once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.atomic import atomic_path
from imgclf.data.imaging import Preprocessing
from imgclf.errors import ModelFileError
from imgclf.inference.metadata import (
    FORMAT_NAME,
    MULTILABEL_FORMAT_VERSION,
    SINGLE_LABEL_FORMAT_VERSION,
    parse_metadata,
    preprocessing_of,
    without_non_finite,
)
from imgclf.inference.predictor import Predictor, short_list
from imgclf.inference.unknown import BANK_TENSOR, UnknownDetector
from imgclf.options import DEFAULT_MODEL_PATH as DEFAULT_MODEL_PATH  # the default of train --out

INT8_TENSOR = "int8.onnx"
_CORE_KEYS = ("labels", "arch", "timm_name", "preprocessing", "num_features", "format", "format_version", "tta",
              "unknown", "multilabel")  # fmt: skip
#: What an old model file says, once, about the ``known`` it cannot give.
NO_DETECTOR = ("has no unknown-input detector (it was trained before imgclf had one): its predictions carry "
               "known: null; train it again to get one")  # fmt: skip


def library_versions() -> dict[str, str]:
    """Versions that made a model, recorded in its file for reproducibility."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from imgclf.version import __version__

    versions = {"imgclf": __version__, "python": platform.python_version()}
    for mod, dist in (("torch", "torch"), ("timm", "timm"), ("numpy", "numpy"), ("PIL", "pillow")):
        try:  # from the installed metadata: importing timm only to read its version costs 2.5 s
            versions[mod] = version(dist)
        except PackageNotFoundError:
            pass
    return versions


def head_probabilities(head, features: np.ndarray, multilabel: bool = False) -> np.ndarray:
    """Softmax (a sigmoid per label when ``multilabel``) of a linear ``head`` (torch ``Linear``)
    on pooled ``features``, in numpy: the model's own head, the fold heads that certify a
    precision (:mod:`imgclf.training.certify`) and those that place multi-label thresholds."""
    weight = head.weight.detach().float().cpu().numpy()
    logits = features @ weight.T + head.bias.detach().float().cpu().numpy()
    if multilabel:
        from imgclf.inference.multilabel import sigmoid

        return sigmoid(logits)
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


class ImageClassifier(Predictor):
    """A pretrained backbone plus a trained linear head, ready to predict.

    Attributes ending in ``_`` were learned or measured in training.
    """

    def __init__(
        self,
        backbone,
        head,
        labels: list[str],
        *,
        arch: str,
        timm_name: str,
        preprocessing: Preprocessing,
        info: dict[str, Any] | None = None,
        device: str = "cpu",
        engine: str = "auto",
        tta: bool = False,
        precision: str = "auto",
        int8_graph: bytes | None = None,
        unknown: UnknownDetector | None = None,
        thresholds: list[float] | None = None,
    ):
        self.unknown_ = unknown  # the unknown-input detector, fitted by training (imgclf.inference.unknown)
        self.thresholds = None if thresholds is None else [float(t) for t in thresholds]  # multi-label: sigmoid head
        self.tta = tta  # average with the horizontally flipped image
        self.device = device
        self.timm_name = timm_name
        self._backbone = self._backbone_tensors = None
        if isinstance(backbone, dict):  # tensors only: the network is built on first use (see backbone)
            self._backbone_tensors = backbone
        else:
            self._backbone = backbone.eval().to(device)
        self.head = head.eval().to(device)
        self.held_out_features_ = None  # the held-out images' pooled features, set by training (evaluate_held_out)
        self.held_out_stored_ = None  # (features, label positions) of held-out images kept by a model trained on
        self.stored_features_ = None  # StoredFeatures to save (imgclf.inference.stored)
        self._stored_in: Path | None = None  # the file a loaded model's stored features are read from when saved
        self.engine = engine
        self.precision = precision
        self.int8_graph_ = int8_graph  # the calibrated int8 network (imgclf.inference.precision)
        self.features_engine = None  # built on first use, see _engine_for
        self._eager = None
        self._backbone_graph = None  # the backbone exported once, whichever engine then runs it
        self._scored_graph = None  # (what it was made of, the exported graph): see _export_graph
        self._explain_session = None  # the graph with class maps, built on the first explanation
        self.labels = list(labels)
        self.classes_ = self.labels
        self.arch = arch
        self.preprocessing = preprocessing
        self.info = dict(info or {})
        self._checkpoint = None  # the training run's checkpoint, removed once this model is saved

    @property
    def backbone(self):
        """The pretrained (or fine-tuned) network up to its pooled features. A model trained
        on cached features holds only its tensors until something needs the network: a
        run that saves it never imports timm."""
        if self._backbone is None:
            import torch

            from imgclf.nets.archs import create_network

            # built as ordinary tensors even when first asked for inside torch.inference_mode(): made
            # there, every weight would be an inference tensor for good, and the next eager run
            # outside it fails ("Inference tensors do not track version counter")
            with torch.inference_mode(False):
                network = create_network(self.timm_name, num_classes=0)
                network.load_state_dict(self._backbone_tensors, strict=True)
                self._backbone, self._backbone_tensors = network.eval().to(self.device), None
        return self._backbone

    @backbone.setter
    def backbone(self, module) -> None:
        self._backbone, self._backbone_tensors = module, None
        self.held_out_features_ = None  # a new backbone makes other features
        self._explain_session = self._scored_graph = None

    def _backbone_state(self) -> dict:
        return self._backbone_tensors if self._backbone is None else self._backbone.state_dict()

    def evaluate_held_out(self, images):
        """Metrics on the held-out ``images`` training set aside. Their pooled features
        are already known (``held_out_features_``), so a head-only model without test-time
        augmentation is scored from them, the same numbers to 1e-5 as :meth:`evaluate`
        and no network pass; otherwise this is :meth:`evaluate`."""
        features = self.held_out_features_
        if features is None or self.tta or len(features) != len(images):
            return self.evaluate(images)
        if self.multilabel:
            from imgclf.data.images import label_set
            from imgclf.inference.multilabel import compute_multilabel_metrics, label_matrix

            y = label_matrix([label_set(im) for im in images], self.labels)
            return compute_multilabel_metrics(self._head_probabilities(features), y, self.labels, self.thresholds)
        from imgclf.inference.metrics import compute_metrics

        targets = [self.labels.index(im.label) for im in images]
        if self.held_out_stored_ is not None:  # trained on from a model: its held-out images count too
            features = np.concatenate([features, self.held_out_stored_[0]])
            targets += [int(t) for t in self.held_out_stored_[1]]
        return compute_metrics(self._head_probabilities(features), targets, self.labels)

    @property
    def checkpoint_path_(self) -> Path | None:
        """Where the run that trained this model is kept until the model is saved (then None)."""
        return None if self._checkpoint is None else self._checkpoint.path

    def __repr__(self) -> str:
        accuracy = (self.metrics_ or {}).get("micro_accuracy")
        held_out = f", held_out_accuracy={accuracy:.4f}" if isinstance(accuracy, float) else ""
        return (f"ImageClassifier(arch={self.arch!r}, labels={short_list(self.labels)}, "
                f"input_size={self.preprocessing.input_size}, tta={self.tta}, device={self.device!r}{held_out})")  # fmt: skip

    def network(self):
        """Backbone, head and softmax (a sigmoid for a multi-label model) as one module (for export)."""
        import torch

        last = torch.nn.Sigmoid() if self.multilabel else torch.nn.Softmax(dim=1)
        return torch.nn.Sequential(self.backbone, self.head, last)

    def scored_network(self, tta: bool | None = None, maps: bool = False):
        """The exported module: images -> probabilities (softmax, or a sigmoid per label for a
        multi-label model; flip-averaged when ``tta``), and with a detector the unknown score of
        the image as given, as a second output; with ``maps``, the class activation maps
        (:mod:`imgclf.inference.explain`) as the last output."""
        import torch

        tta = self.tta if tta is None else tta
        detector = None if self.unknown_ is None else self.unknown_.module()
        if maps:
            from imgclf.inference.explain import explained_module

            explained = explained_module(self.backbone, self.head, tta, multilabel=self.multilabel)

            class Mapped(torch.nn.Module):
                def __init__(self, explained, detector):
                    super().__init__()
                    self.explained, self.detector = explained, detector

                def forward(self, x: torch.Tensor):
                    features, probs, class_maps = self.explained(x)
                    if self.detector is None:
                        return probs, class_maps
                    return probs, self.detector(features), class_maps

            return Mapped(explained, detector).eval()
        from imgclf.inference.multilabel import torch_probabilities

        multilabel = self.multilabel

        def probabilities(logits: torch.Tensor) -> torch.Tensor:
            return torch_probabilities(logits, multilabel)

        class Scored(torch.nn.Module):
            def __init__(self, backbone, head, detector):
                super().__init__()
                self.backbone, self.head, self.detector = backbone, head, detector

            def forward(self, x: torch.Tensor):
                features = self.backbone(x)
                probs = probabilities(self.head(features))
                if tta:
                    probs = (probs + probabilities(self.head(self.backbone(torch.flip(x, dims=[3]))))) / 2
                if self.detector is None:
                    return probs
                return probs, self.detector(features)

        return Scored(self.backbone, self.head, detector).eval()

    def why_not_explainable(self) -> str | None:
        """None where class activation maps are exact for this network (global average
        pooling, then the linear head); else why they are not."""
        from imgclf.inference.explain import why_not_explainable

        return why_not_explainable(self.backbone)

    def _explained(self, arrays: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Probabilities, unknown scores and class maps, from the graph that export writes
        (built once, run by ONNX Runtime): the same maps as the exported file gives."""
        if getattr(self, "_explain_session", None) is None:
            from imgclf.errors import NotExplainableError
            from imgclf.nets.engines import OnnxSession

            why = self.why_not_explainable()
            if why is not None:
                raise NotExplainableError(f"cannot explain this model's predictions: {why}")
            self._explain_session = OnnxSession(self._export_graph(), self.threads)
        outputs = self._explain_session.outputs(arrays)
        scores = outputs[1].reshape(-1) if self.unknown_ is not None else None
        return outputs[0], scores, outputs[-1]

    def _export_graph(self) -> bytes:
        """The graph export writes (:func:`imgclf.inference.export.scored_graph_bytes`), built once
        per head: explanations run it, and bf16 does, so that the .onnx answers the same."""
        from imgclf.inference.export import scored_graph_bytes

        made_of = (id(self.head), id(self.unknown_), self.tta)  # a head set since makes another graph
        if self._scored_graph is None or self._scored_graph[0] != made_of:
            self._scored_graph = (made_of, scored_graph_bytes(self))
        return self._scored_graph[1]

    def engine_choice(self, images: int | None = None):
        """The engine and precision :func:`imgclf.nets.engines.choose_engine` picks for this
        model's ``engine`` and ``precision`` (``images``: the job's size, if known)."""
        from imgclf.nets.engines import choose_engine

        images = self.job_size if images is None else images
        return choose_engine(self.engine, self.precision, device=self.device, images=images,
                             accuracy=self.info.get("precision_metrics"), int8_ready=self.int8_graph_ is not None,
                             multilabel=self.thresholds is not None)  # fmt: skip

    def use_engine(self, engine: str = "auto", precision: str = "auto"):
        """Run the network on ``engine`` at ``precision`` from now on; returns the choice made."""
        self.engine, self.precision = engine, precision
        self.features_engine = None
        return self._engine_for(self.batch_size, force=True).choice

    def _engine_for(self, batch: int, force: bool = False):
        """The network's engine, as :func:`~imgclf.nets.engines.choose_engine` names it for a
        job of this size (the job's, when known, else this batch's): the precision never
        depends on it, only whether a few images on fp32 run eagerly (no graph to build)
        or on a graph engine built once. At int8 it runs the whole calibrated network,
        at bf16 the whole exported one (its engine says ``whole_network``), otherwise the backbone."""
        from imgclf.nets.engines import EAGER_MAX_IMAGES, TorchEngine, create_engine, open_engine

        if self.features_engine is not None:
            return self.features_engine
        images = None if force else (self.job_size if self.job_size is not None else batch)
        choice = self.engine_choice(images)
        eager_for_size = choice.engine == "torch" and images is not None and images < EAGER_MAX_IMAGES
        if eager_for_size and self.engine == "auto":
            if self._eager is None:
                self._eager = TorchEngine(self.backbone, self.device)
            self._eager.choice = choice
            return self._eager
        if choice.precision == "int8":
            built = open_engine(choice, self.int8_graph_, self.threads)
            built.whole_network = True
        elif choice.precision == "bf16":  # the exported graph itself, so that the .onnx answers the same
            built = open_engine(choice, self._export_graph(), self.threads)
            built.whole_network = True
        elif choice.engine == "torch":
            built = create_engine(self.backbone, self.preprocessing.shape, self.device, choice)
        else:
            from imgclf.nets.onnx_graph import to_onnx_bytes

            if self._backbone_graph is None:
                self._backbone_graph = to_onnx_bytes(self.backbone, self.preprocessing.shape)
            built = open_engine(choice, self._backbone_graph, self.threads)
        built.choice = choice
        self.features_engine = built
        return built

    @property
    def unknown_threshold(self) -> float | None:
        return None if self.unknown_ is None else self.unknown_.threshold

    def _outputs(self, arrays: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        engine = self._engine_for(len(arrays))
        if getattr(engine, "whole_network", False):
            # the calibrated int8 graph (or at bf16 the exported one) holds head, softmax, test-time
            # augmentation and (since the detector exists) the unknown score as its second output
            outputs = engine.outputs(arrays)
            score = outputs[1].reshape(-1) if len(outputs) > 1 and self.unknown_ is not None else None
            return outputs[0], score
        features = engine(arrays)
        probs = self._head_probabilities(features)
        if self.tta:
            probs = (probs + self._head_probabilities(engine(np.ascontiguousarray(arrays[..., ::-1])))) / 2
        return probs, None if self.unknown_ is None else self.unknown_.score(features)

    def _head_probabilities(self, features: np.ndarray) -> np.ndarray:
        return head_probabilities(self.head, features, self.multilabel)

    def to(self, device: str) -> ImageClassifier:
        """Move to ``device`` ("cpu", "cuda", ...) and return self."""
        from imgclf.nets.device import resolve_device

        device = resolve_device(device)  # "gpu" was torch's own RuntimeError; auto picks as training does
        if self._backbone is not None:
            self._backbone.to(device)
        self.head.to(device)
        self.device = device
        self.features_engine = self._eager = self._backbone_graph = self._explain_session = self._scored_graph = None
        return self

    def config(self) -> dict[str, Any]:
        """The metadata saved with the model (checked by :mod:`imgclf.inference.metadata` on load)."""
        return without_non_finite(
            {
                "format": FORMAT_NAME,
                "format_version": MULTILABEL_FORMAT_VERSION if self.multilabel else SINGLE_LABEL_FORMAT_VERSION,
                "labels": self.labels,
                "arch": self.arch,
                "timm_name": self.timm_name,
                "num_features": int(self.head.in_features),
                "preprocessing": self.preprocessing.to_dict(),
                "tta": bool(self.tta),
                **({"unknown": self.unknown_.config()} if self.unknown_ is not None else {}),
                **({"multilabel": {"thresholds": self.thresholds}} if self.multilabel else {}),
                **self.info,
            }
        )

    def save(self, path: str | Path = DEFAULT_MODEL_PATH) -> Path:
        """Write the model to one file, atomically: a crash never leaves a
        half-written file under ``path``. The checkpoint of the run that trained
        this model is removed only now, once the model is safely written."""
        from safetensors.torch import save_file

        from imgclf.atomic import check_output_path
        from imgclf.data.uris import as_local

        if not isinstance(path, (str, Path)):
            raise ModelFileError(f"save takes the model file's path, got {type(path).__name__}")
        path = Path(as_local(path))
        if path.is_dir():
            raise ModelFileError(f"{path}: is a folder; give a file name such as {path / DEFAULT_MODEL_PATH}")
        check_output_path(path, "model", model="safetensors")  # an image or notes typed as the name are kept
        tensors = {f"backbone.{k}": v for k, v in self._backbone_state().items()}
        tensors.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        if self.unknown_ is not None:
            import torch

            tensors[BANK_TENSOR] = torch.from_numpy(np.ascontiguousarray(self.unknown_.bank, np.float32))
        if self.int8_graph_ is not None:
            import torch

            tensors[INT8_TENSOR] = torch.frombuffer(bytearray(self.int8_graph_), dtype=torch.uint8)
        config = self.config()
        stored = self._stored_to_save(config)
        config.pop("stored_features", None)
        if stored is not None:
            tensors.update(stored.tensors())
            config["stored_features"] = stored.metadata()
        metadata = {FORMAT_NAME: json.dumps(config)}
        with atomic_path(path, "model") as tmp:
            save_file(tensors, tmp, metadata=metadata)
        if self._checkpoint is not None:
            self._checkpoint.remove()
            self._checkpoint = None
        return path

    def _stored_to_save(self, config: dict):
        """The stored features to write: this model's, or those of the file it was loaded from
        (read now, before the file may be replaced; a file gone since is one warning)."""
        if self.stored_features_ is not None or self._stored_in is None:
            return self.stored_features_
        from imgclf.inference.stored import read_stored

        try:
            return read_stored(self._stored_in, config)
        except (OSError, ModelFileError) as e:
            import warnings

            warnings.warn(f"{self._stored_in}: its stored features are not carried over ({e}); "
                          "'train --from' cannot add to the saved model", stacklevel=3)  # fmt: skip
            return None

    def export_onnx(self, path: str | Path, **options) -> Path:
        """Export the whole network to ONNX (see :func:`imgclf.inference.export.export_onnx`)."""
        from imgclf.inference.export import export_onnx

        return export_onnx(self, path, **options)


def read_model_config(path: str | Path) -> dict[str, Any]:
    """The metadata of an imgclf model file, checked field by field; raises :class:`ModelFileError`."""
    from safetensors import safe_open

    from imgclf.data.uris import local_model_file
    from imgclf.filetypes import WHAT_IT_IS

    path = local_model_file(path)
    kind = file_kind(path)
    if kind == "onnx":
        from imgclf.inference.runtime import METADATA_KEY, onnx_metadata

        try:
            exported = METADATA_KEY in onnx_metadata(path)
        except (OSError, ValueError):
            exported = False
        if not exported:  # someone else's network: imgclf can neither score it nor export it
            raise ModelFileError(f"{path}: is an ONNX model that imgclf did not export (no labels or preprocessing "
                                 "in it); give the .imgclf file that 'imgclf train' wrote")  # fmt: skip
        raise ModelFileError(f"{path}: is an exported ONNX model, not an imgclf model file (it predicts and serves "
                             "as it is; exporting needs the .imgclf file it came from)")  # fmt: skip
    if kind != "safetensors":
        raise ModelFileError(f"{path}: not a readable imgclf model file ({WHAT_IT_IS[kind]})")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise ModelFileError(
            f"{path}: not a readable imgclf model file ({type(e).__name__}: {_first_line(e)})"
        ) from None
    if FORMAT_NAME not in meta:
        raise ModelFileError(f"{path}: safetensors file without imgclf metadata; it was not saved by imgclf")
    return parse_metadata(meta[FORMAT_NAME], path, "imgclf")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def file_kind(path: Path) -> str:
    """What the file at ``path`` holds, from its first bytes; raises if it is missing."""
    from imgclf.filetypes import sniff

    if not path.is_file():
        raise ModelFileError(
            f"{path}: model file not found" if not path.is_dir() else f"{path}: is a folder, not a model file"
        )
    try:
        return sniff(path)
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read model file ({e.strerror or e})") from None


def _check_tensor_shapes(path: Path, config: dict[str, Any]) -> None:
    """The head's shape must match the labels and feature count the metadata names (read from the header only)."""
    from safetensors import safe_open

    n_labels, n_features = len(config["labels"]), config["num_features"]
    with safe_open(str(path), framework="numpy") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in ("head.weight", "head.bias") if k in f.keys()}
    if len(shapes) < 2:
        raise ModelFileError(f"{path}: model weights are incomplete (no classifier head)")
    if shapes["head.weight"] != [n_labels, n_features] or shapes["head.bias"] != [n_labels]:
        raise ModelFileError(
            f"{path}: the classifier weights are for {shapes['head.weight'][0]} labels of "
            f"{shapes['head.weight'][-1]} features, but the metadata names {n_labels} labels of {n_features}"
        )
    unknown = config.get("unknown")
    if unknown is not None:
        with safe_open(str(path), framework="numpy") as f:
            bank = list(f.get_slice(BANK_TENSOR).get_shape()) if BANK_TENSOR in f.keys() else None
            dtype = f.get_slice(BANK_TENSOR).get_dtype() if bank is not None else None
        if bank != [unknown["bank_images"], n_features] or dtype != "F32":
            raise ModelFileError(f"{path}: the unknown-input detector's bank is {bank or 'missing'} ({dtype}), but "
                                 f"the metadata names {unknown['bank_images']} float32 vectors of {n_features} "
                                 "features")  # fmt: skip


def load_model(path: str | Path, device: str = "cpu", engine: str = "auto", precision: str = "auto") -> ImageClassifier:
    """Load a model saved by :meth:`ImageClassifier.save`; checks it is complete and consistent.

    Only the architectures built into timm are built, with random weights that the
    file's weights then replace: loading a model file never touches the network.
    ``engine`` (auto, onnxruntime, openvino, torch) and ``precision`` (auto, fp32,
    bf16, int8): see :func:`imgclf.nets.engines.choose_engine`.
    """
    import torch
    from safetensors.torch import load_file

    from imgclf.data.uris import local_model_file
    from imgclf.errors import ArchitectureError
    from imgclf.nets.archs import create_network, is_builtin_model
    from imgclf.nets.device import resolve_device

    path = local_model_file(path)
    config = read_model_config(path)
    _check_tensor_shapes(path, config)
    if not is_builtin_model(config["timm_name"]):
        raise ModelFileError(f"{path}: timm_name '{config['timm_name']}' is not an architecture this timm "
                             "knows; upgrade timm (a model file never fetches code or weights from the network)")  # fmt: skip
    try:
        backbone = create_network(config["timm_name"], num_classes=0)
    except ArchitectureError as e:
        raise ModelFileError(f"{path}: {e}") from None
    if getattr(backbone, "num_features", config["num_features"]) != config["num_features"]:
        raise ModelFileError(f"{path}: metadata says {config['num_features']} features, but "
                             f"'{config['timm_name']}' gives {backbone.num_features}")  # fmt: skip
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise ModelFileError(f"{path}: model tensors are unreadable ({type(e).__name__}: {_first_line(e)})") from None
    head = torch.nn.Linear(config["num_features"], len(config["labels"]))
    from imgclf.inference.stored import FEATURES

    stored_in = path if FEATURES in tensors else None
    tensors = {k: v for k, v in tensors.items() if not k.startswith("stored.")}  # read by train --from alone
    for prefix, module in (("backbone.", backbone), ("head.", head)):
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ModelFileError(f"{path}: model weights are incomplete or do not match ({_first_line(e)})") from None
    info = {k: v for k, v in config.items() if k not in _CORE_KEYS}
    int8 = tensors.get(INT8_TENSOR)
    unknown = None
    if config.get("unknown") is not None:
        unknown = UnknownDetector.from_config(config["unknown"], tensors[BANK_TENSOR].numpy())
    else:  # trained before imgclf fitted one (multi-label models: before 7 December 2026)
        import warnings

        warnings.warn(f"{path}: {NO_DETECTOR}", stacklevel=2)
    model = ImageClassifier(
        backbone, head, config["labels"], arch=config["arch"], timm_name=config["timm_name"],
        preprocessing=preprocessing_of(config), info=info, device=resolve_device(device),
        engine=engine, tta=config.get("tta", False), precision=precision,
        int8_graph=None if int8 is None else int8.numpy().tobytes(), unknown=unknown,
        thresholds=(config.get("multilabel") or {}).get("thresholds"),
    )  # fmt: skip
    model._stored_in = stored_in
    return model
