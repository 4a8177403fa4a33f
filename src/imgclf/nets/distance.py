"""How far photos are from ImageNet, read from the pooled features training computes anyway.

The network's last batch-norm layer before global pooling learned, on ImageNet, the mean and
variance of each channel it normalises. Carried through that layer and its activation
(a channel's input taken as normal), they give the mean and the variance of each pooled
feature over ImageNet photos, with no ImageNet photo at hand. The distance of a set of photos
is the mean over channels of their features' squared mean shift, in units of that variance,
less the shift a sample of that size shows by chance.

It costs no pass through the network (the features are cached; the four tensors are in the
weights), so ``--quality balanced`` can decide on every run. Measured with EfficientNet-Lite0:
ImageNet photos (the 19 of imagenet-sanity) 0.026, the bundled flowers 0.07, brain MRI slices
0.20 to 0.22; 16 photos give the same picture (0.025, 0.06, 0.19).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from imgclf.nets.archs import Architecture

#: The distance at or above which photos count as unlike ImageNet: between the flowers (0.07),
#: where fine-tuning gained 0.5 points, and MRI slices (0.21), where it gained 5 (docs: Benchmarks).
FEATURE_DISTANCE_THRESHOLD = 0.12
_GRID = np.linspace(-8.0, 8.0, 1601)  # a standard normal's support, finely enough for four digits
_WEIGHTS = np.exp(-(_GRID**2) / 2)
_WEIGHTS /= _WEIGHTS.sum()


def imagenet_feature_moments(arch: Architecture, state: Mapping) -> tuple[np.ndarray, np.ndarray] | None:
    """Each pooled feature's mean and variance over ImageNet photos, from the final batch-norm
    layer's running statistics and affine weights in ``state`` (timm's names; tensors or arrays).
    None when the table does not say which layer that is, or ``state`` lacks it."""
    if arch.final_norm is None:
        return None
    name, top = arch.final_norm
    try:
        gamma, beta = (np.asarray(_numpy(state[f"{name}.{k}"]), np.float64) for k in ("weight", "bias"))
    except KeyError:
        return None
    # normalised by the running statistics, a channel is gamma * z + beta with z ~ N(0, 1)
    values = np.maximum(gamma[:, None] * _GRID[None, :] + beta[:, None], 0.0)
    if top is not None:
        values = np.minimum(values, top)
    mean = values @ _WEIGHTS
    var = ((values - mean[:, None]) ** 2) @ _WEIGHTS
    return mean, var


def feature_distance(features: np.ndarray, moments: tuple[np.ndarray, np.ndarray]) -> float:
    """The distance of the photos whose pooled ``features`` (n, channels) are given from ImageNet's
    ``moments`` (:func:`imagenet_feature_moments`): mean over channels of (shift^2 - sampling) / var."""
    mean, var = moments
    n = len(features)
    shift = features.mean(0, dtype=np.float64) - mean
    sampling = features.var(0, dtype=np.float64) / n if n > 1 else np.zeros_like(shift)
    return float(np.mean(np.maximum(shift**2 - sampling, 0.0) / (var + 1e-6)))


def _numpy(value) -> np.ndarray:
    return value.detach().cpu().float().numpy() if hasattr(value, "detach") else np.asarray(value)
