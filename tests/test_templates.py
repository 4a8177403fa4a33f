"""The shipped graph templates stand for the networks they replace in the feature pass:
the same state dict, the same features (1e-4; measured 5e-6), and a fallback to the
network when a weights file does not fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imgclf.nets.archs import ARCHITECTURES, create_backbone, package_weights_file
from imgclf.nets.templates import state_from_file, template_engine, template_for

from .conftest import FLOWERS

PACKAGED = [a for a in ARCHITECTURES.values() if a.weights_package and package_weights_file(a)]


@pytest.mark.parametrize("arch", PACKAGED, ids=lambda a: a.name)
def test_a_template_runs_the_pretrained_network(arch):
    from imgclf.data.imaging import load_array
    from imgclf.nets.archs import preprocessing_for
    from imgclf.nets.engines import TorchEngine

    template = template_for(arch)
    assert template is not None, f"no template shipped for {arch.name}: python -m imgclf.nets.templates"
    state = state_from_file(template, package_weights_file(arch))
    backbone, _ = create_backbone(arch)
    wanted = backbone.state_dict()
    assert set(state) == set(wanted) and all(torch.equal(state[k], wanted[k]) for k in wanted)
    prep = preprocessing_for(arch)
    arrays = np.stack([load_array(f, prep) for f in sorted(FLOWERS.glob("*/*.jpg"))[::25]])
    expected = TorchEngine(backbone)(arrays)
    assert np.abs(template_engine(template, state)(arrays) - expected).max() < 1e-4


def test_a_weights_file_that_does_not_fit_the_template_builds_the_network(tmp_path):
    from safetensors.torch import save_file

    arch = ARCHITECTURES["efficientnet_lite0"]
    template = template_for(arch)
    state = state_from_file(template, package_weights_file(arch))
    del state["conv_head.weight"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "partial.safetensors"))
    assert state_from_file(template, tmp_path / "partial.safetensors") is None
