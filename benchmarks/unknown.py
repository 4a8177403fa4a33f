"""How often the unknown-input detector says ``known: false``, on data it was not tuned on.

The default model (efficientnet_lite0, head only) on the bundled flowers. Measured:

- **in-distribution**: 5-fold cross-fitting over all 200 flowers: each fold's 40 photos are
  scored by a model trained on the other 160 (its own detector and threshold), so every
  photo is one the model never saw; the share flagged ``known: false`` (target: <= 5%);
- **far out-of-distribution, measured** (never used to choose anything): brain-mri-600
  (600 MRI slices; not shipped, default ../shared/data/brain-mri-600) and 200 procedural
  grayscale textures of family B (gratings, 1/f noise, Voronoi cells, dots);
- **far out-of-distribution, tuned on** (where k and the method were chosen): the 19
  imagenet-sanity photos and 40 textures of family A (blurred noise, checkerboards);
- **near out-of-distribution**: each flower label left out of training in turn, its 40
  photos scored by a model of the other four: how often a flower the model has no label
  for passes as known (the hard case);
- AUROC of the unknown score, each OOD set against the in-distribution photos; and the
  alternative measured against it, Mahalanobis distance to class-conditional Gaussians
  (tied covariance, shrinkage 0.1) with its threshold placed the same way (``--compare``).

    python benchmarks/unknown.py                 # all of it, about 2 minutes on 2 cores
    python benchmarks/unknown.py --compare       # also Mahalanobis on the same features
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from imgclf import ImageClassificationTrainer, load_images_from_directory, sample_data_dir
from imgclf.data.images import ImageData, find_image_files
from imgclf.inference.unknown import stratified_folds

REPO = Path(__file__).resolve().parent.parent


def default_brain_path() -> Path:
    for folder in REPO.parents:
        candidate = folder / "shared" / "data" / "brain-mri-600"
        if candidate.is_dir():
            return candidate
    return REPO.parent / "shared" / "data" / "brain-mri-600"


def textures_a(n: int, seed: int = 0) -> list[Image.Image]:
    """Tuning family: Gaussian-blurred noise and checkerboards."""
    rng = np.random.default_rng(seed)
    out = []
    y, x = np.mgrid[:256, :256]
    for i in range(n):
        if i % 2 == 0:
            noise = Image.fromarray((rng.random((256, 256)) * 255).astype(np.uint8))
            out.append(noise.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 6))).convert("RGB"))
        else:
            s = int(rng.integers(8, 64))
            out.append(Image.fromarray(((((x // s) + (y // s)) % 2) * 255).astype(np.uint8)).convert("RGB"))
    return out


def textures_b(n: int, seed: int = 1) -> list[Image.Image]:
    """Measuring family, never tuned on: gratings, 1/f noise, Voronoi edges, blurred dots."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:256, :256].astype(float)
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            th, f = rng.uniform(0, np.pi), rng.uniform(0.02, 0.3)
            a = 127.5 + 127.5 * np.sin(f * (x * np.cos(th) + y * np.sin(th)))
        elif kind == 1:
            freq = np.fft.fftfreq(256)
            r = np.sqrt(freq[:, None] ** 2 + freq[None, :] ** 2)
            r[0, 0] = 1
            spectrum = (rng.normal(size=(256, 256)) + 1j * rng.normal(size=(256, 256))) / r ** rng.uniform(1, 2)
            a = np.real(np.fft.ifft2(spectrum))
            a = (a - a.min()) / np.ptp(a) * 255
        elif kind == 2:
            pts = rng.random((int(rng.integers(10, 60)), 2)) * 256
            d = np.sort(np.sqrt((x[..., None] - pts[:, 0]) ** 2 + (y[..., None] - pts[:, 1]) ** 2), axis=-1)
            a = np.clip((d[..., 1] - d[..., 0]) * 8, 0, 255)
        else:
            a = np.zeros((256, 256))
            for _ in range(int(rng.integers(20, 200))):
                cx, cy, rr = rng.random() * 256, rng.random() * 256, rng.uniform(2, 15)
                a[(x - cx) ** 2 + (y - cy) ** 2 < rr * rr] = 255
            a = np.asarray(Image.fromarray(a.astype(np.uint8)).filter(ImageFilter.GaussianBlur(1)))
        out.append(Image.fromarray(a.astype(np.uint8)).convert("RGB"))
    return out


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of an OOD image > score of an in-distribution one), ties counted half."""
    scores = np.concatenate([positive, negative])
    order = scores.argsort(kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks of ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    return float((ranks[: len(positive)].sum() - len(positive) * (len(positive) + 1) / 2) / (len(positive) * len(negative)))


def scores_of(model, images) -> np.ndarray:
    return np.array([p.unknown_score for p in model.predict_batch(images)])


def mahalanobis(x_train, y_train, x, shrinkage: float = 0.1) -> np.ndarray:
    means = np.stack([x_train[y_train == c].mean(0) for c in np.unique(y_train)])
    resid = x_train - means[y_train]
    cov = resid.T @ resid / len(resid)
    cov = (1 - shrinkage) * cov + shrinkage * np.trace(cov) / len(cov) * np.eye(len(cov))
    precision = np.linalg.inv(cov)
    return np.stack([np.einsum("ij,jk,ik->i", x - m, precision, x - m) for m in means], 1).min(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--brain", type=Path, default=default_brain_path())
    parser.add_argument("--workspace", default=None, help="feature cache (default: imgclf's)")
    parser.add_argument("--compare", action="store_true", help="also Mahalanobis distance on the same features")
    args = parser.parse_args()
    started = time.perf_counter()
    flowers = load_images_from_directory(sample_data_dir("flowers"))
    labels = sorted({im.label for im in flowers})
    y = np.array([labels.index(im.label) for im in flowers])
    sets = {
        "brain-mri-600 (measured)": find_image_files([args.brain]) if args.brain.is_dir() else [],
        "textures B, 200 (measured)": textures_b(200),
        "imagenet-sanity, 19 (tuned on)": find_image_files([REPO / "tests" / "data" / "imagenet-sanity"]),
        "textures A, 40 (tuned on)": textures_a(40),
    }
    if not sets["brain-mri-600 (measured)"]:
        print(f"note: {args.brain} not found; brain-mri-600 left out", file=sys.stderr)

    def trainer():
        return ImageClassificationTrainer(workspace=args.workspace, progress=False, precision="fp32")

    in_scores, in_known, ood = np.zeros(len(flowers)), np.zeros(len(flowers), bool), {k: [] for k in sets}
    maha_in, maha_ood = np.zeros(len(flowers)), {k: [] for k in sets}
    thresholds = []
    for fold in stratified_folds(y, 5, seed=7):
        train = [flowers[i] for i in np.setdiff1d(np.arange(len(flowers)), fold)]
        model = trainer().fit(train)
        thresholds.append(model.unknown_.threshold)
        predictions = model.predict_batch([flowers[i] for i in fold])
        in_scores[fold] = [p.unknown_score for p in predictions]
        in_known[fold] = [p.known for p in predictions]
        for name, images in sets.items():
            if images:
                ood[name].append(scores_of(model, images) > model.unknown_.threshold)
                ood[name + " scores"] = ood.get(name + " scores", []) + [scores_of(model, images)]
        if args.compare:
            feats = _features(model, train), _features(model, [flowers[i] for i in fold])
            y_train = np.array([labels.index(im.label) for im in train])
            oof = np.zeros(len(train))
            for inner in stratified_folds(y_train, 5, seed=1):
                rest = np.setdiff1d(np.arange(len(train)), inner)
                oof[inner] = mahalanobis(feats[0][rest], y_train[rest], feats[0][inner])
            cut = np.quantile(oof, 0.95)
            maha_in[fold] = mahalanobis(feats[0], y_train, feats[1]) > cut
            for name, images in sets.items():
                if images:
                    maha_ood[name].append(mahalanobis(feats[0], y_train, _features(model, images)) > cut)
    print(f"Default model ({trainer().arch}, head only), 5-fold cross-fitting over the {len(flowers)} bundled flowers; "
          f"thresholds {min(thresholds):.3f} to {max(thresholds):.3f}")  # fmt: skip
    print(f"\n{'set':<34} {'images':>6} {'flagged known: false':>21} {'AUROC':>7}" + ("  Mahalanobis" if args.compare else ""))
    maha = f"  {np.mean(maha_in):11.1%}" if args.compare else ""
    print(f"{'flowers never seen (in-dist.)':<34} {len(flowers):>6} {np.mean(~in_known):>21.1%} {'':>7}{maha}")
    for name, images in sets.items():
        if not images:
            continue
        flagged = np.mean(np.concatenate(ood[name]))
        area = np.mean([auroc(s, in_scores) for s in ood[name + " scores"]])
        maha = f"  {np.mean(np.concatenate(maha_ood[name])):11.1%}" if args.compare else ""
        print(f"{name:<34} {len(images):>6} {flagged:>21.1%} {area:>7.3f}{maha}")

    print("\nNear out-of-distribution: each label left out of training, its photos scored by the other four's model")
    passed_all = []
    for label in labels:
        model = trainer().fit([im for im in flowers if im.label != label])
        left_out = [im for im in flowers if im.label == label]
        passed = np.mean([p.known for p in model.predict_batch(left_out)])
        passed_all.append(passed)
        print(f"  {label:<12} {len(left_out)} photos, {passed:.1%} pass as known")
    print(f"  mean: {np.mean(passed_all):.1%} of flowers of a species the model has no label for pass as known")
    print(f"\n{time.perf_counter() - started:.0f} s")
    return 0


def _features(model, images) -> np.ndarray:
    """The model's own pooled features of ``images`` (paths, ImageData or PIL images)."""
    from imgclf.data.imaging import load_array

    arrays = []
    for im in images:
        source = im.source if isinstance(im, ImageData) else im
        arrays.append(load_array(source, model.preprocessing, "x"))
    engine = model._engine_for(len(arrays))
    return np.concatenate([engine(np.stack(arrays[i : i + 32])) for i in range(0, len(arrays), 32)])


if __name__ == "__main__":
    sys.exit(main())
