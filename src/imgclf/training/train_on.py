"""Training on from an existing model: ``imgclf train NEW --from old.imgclf``.

A head-only model keeps its training images' pooled features
(:mod:`imgclf.inference.stored`). Training on fits a new head on those and the new
images' features together, over the union of the labels (the old model's first, in its
order, then the new ones), which is what training from scratch on both would fit, without
the old photos. The old model's held-out features stay held out: the new model is measured
on them and on a share of the new images.

What cannot be mixed is refused before any work, in one line: another architecture or
preprocessing (the features would not be comparable), a fine-tuned model (its features
came through a backbone no longer the pretrained one, and fine-tuning again needs the
photos), a model that keeps no features. Pretrained weights that differ from those the old
model was trained with are found once the new features are made, by comparing the backbones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from imgclf.data.images import ImageData, check_labels
from imgclf.data.imaging import Preprocessing
from imgclf.errors import DataError, ModelFileError
from imgclf.inference.metadata import preprocessing_of
from imgclf.inference.model import read_model_config
from imgclf.inference.stored import StoredFeatures, read_stored
from imgclf.nets.archs import Architecture
from imgclf.options import option_error


@dataclass
class OldModel:
    """The model trained on from: its file, checked metadata and stored features."""

    path: Path
    sha256: str
    config: dict
    stored: StoredFeatures

    @property
    def labels(self) -> list[str]:
        return list(self.config["labels"])

    def record(self) -> dict:
        """The new model's ``trained_on_from`` metadata field."""
        return {"sha256": self.sha256, "file": self.path.name, "labels": self.labels, "arch": self.config["arch"],
                "stored_images": len(self.stored), "stored_held_out": int(self.stored.held_out.sum()),
                "stored_of_images": int(self.stored.of_images)}  # fmt: skip


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def open_old_model(path: str | Path, arch: Architecture, preprocessing: Preprocessing, fine_tune: bool) -> OldModel:
    """The model at ``path``, checked to be one this run can train on from; raises in one line."""
    from imgclf.data.uris import local_model_file

    if fine_tune:
        raise option_error("fine_tune", "{from_model} with {fine_tune}: fine-tuning trains the backbone on the "
                                        "photos themselves, which a model file does not keep; drop {fine_tune}, "
                                        "or fine-tune on all the photos")  # fmt: skip
    path = local_model_file(path)
    config = read_model_config(path)  # not a model, unreadable, an ONNX file: one ModelFileError line
    name = f"{{from_model}} {path}"
    if config.get("multilabel") is not None:
        raise option_error("from_model", f"{name}: is a multi-label model; training on from one is not supported "
                                         "yet: train on the old and new photos together")  # fmt: skip
    kept = (config.get("fine_tune") or {}).get("kept")
    if kept not in (None, "head-only"):
        raise option_error("from_model", f"{name}: was fine-tuned ({kept}), so its backbone is not the pretrained "
                                         "one and it keeps no features to add to; train on all the photos instead")  # fmt: skip
    if (config["arch"], config["timm_name"]) != (arch.name, arch.timm_name):
        raise option_error("arch", f"{{arch}} {arch.name}: {name} is {config['arch']}; training on keeps its "
                                   f"architecture: give {{arch}} {config['arch']}")  # fmt: skip
    if preprocessing_of(config) != preprocessing:
        raise option_error("from_model", f"{name}: its preprocessing ({config['preprocessing']}) is not "
                                         f"{arch.name}'s here ({preprocessing.to_dict()}); its features cannot be "
                                         "mixed with new ones")  # fmt: skip
    stored = read_stored(path, config)
    if stored is None:
        raise ModelFileError(f"{path}: keeps no training features (saved before imgclf could keep them, or with "
                             "--keep-features-mb 0), so there is nothing to train on from; train on the old and "
                             "new photos together")  # fmt: skip
    return OldModel(path, file_sha256(path), config, stored)


def union_labels(old: OldModel, images: Sequence[ImageData]) -> tuple[list[str], list[str]]:
    """(every label: the old model's in its order, then the new ones sorted; the new images' labels)."""
    if not images:
        raise DataError("training set: no images to add to the model trained on from")
    new = check_labels(images, at_least=1)
    return old.labels + [label for label in new if label not in old.labels], new


def check_same_backbone(old: OldModel, backbone, source: str) -> None:
    """The pretrained backbone of this run must be the one the old model's features came through."""
    import torch
    from safetensors import safe_open

    state = backbone if isinstance(backbone, dict) else backbone.state_dict()
    with safe_open(str(old.path), framework="pt") as f:
        names = [k for k in f.keys() if k.startswith("backbone.")]
        same = len(names) > 0
        for name in names:
            mine = state.get(name[len("backbone.") :])
            theirs = f.get_tensor(name)
            if mine is None or mine.shape != theirs.shape or not torch.equal(mine.detach().cpu(), theirs):
                same = False
                break
    if not same:
        raise option_error("weights", f"{{from_model}} {old.path}: was trained with other pretrained weights "
                                      f"({old.config.get('weights_source')}) than this run's ({source}), so its "
                                      "features and the new ones cannot be mixed; give {weights} with the "
                                      "weights it was trained with")  # fmt: skip
