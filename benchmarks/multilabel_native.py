"""What might lift multi-label accuracy (native shipped since; the rest measured only) on the mosaics of
``benchmarks/multilabel.py`` (the same mosaics, rounds, head training and out-of-fold thresholds;
its squeezed figures are reproduced exactly), one change at a time:

- **native**: the network run on the 448x224 mosaic as it is (it ends in global average
  pooling, so it takes any size) instead of the mosaic squeezed to 224x224 (``--frame whole``);
- **native + mirror at test**: each held-out mosaic's features averaged with its mirror image's;
- **native + mirror in training and at test**: the mirrored training mosaics added as more
  training examples too;
- **native, average and max pooled**: the head on the average- and the max-pooled feature
  map side by side (a multi-instance view: a label present in one place only);
- **native, whole and halves**: the average over the whole map and over its left and right
  halves side by side (the mosaics' own geometry: an upper bound for region pooling);
- **native, logistic regression**: scikit-learn's one-vs-rest logistic regression (C 0.1, 1
  and 10) instead of imgclf's sigmoid head (when scikit-learn is installed).

    python benchmarks/multilabel_native.py      # about 10 minutes on 2 cores
"""

import csv
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/multilabel.py builds the same mosaics
import multilabel as bench
from imgclf import ImageClassificationTrainer
from imgclf.inference.model import head_probabilities
from imgclf.inference.multilabel import choose_thresholds, compute_multilabel_metrics, label_matrix
from imgclf.nets.archs import create_backbone, get_architecture, preprocessing_for
from imgclf.training.multilabel import _cross_fitted_thresholds, train_sigmoid_head

torch.set_num_threads(2)
arch = get_architecture("efficientnet_lite0")
prep = preprocessing_for(arch)
net, _ = create_backbone(arch)
net.eval()
mean = torch.tensor(prep.mean).view(3, 1, 1)
std = torch.tensor(prep.std).view(3, 1, 1)


def feature_maps(paths: list[str], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(images, channels, h, w) feature maps of the images resized to ``size``, and of their mirrors."""
    maps, mirrored = [], []
    for i in range(0, len(paths), 32):
        batch = []
        for p in paths[i : i + 32]:
            img = Image.open(p).convert("RGB").resize(size, Image.Resampling.BICUBIC)
            batch.append((torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255 - mean) / std)
        x = torch.stack(batch)
        with torch.no_grad():
            maps.append(net.forward_features(x).numpy())
            mirrored.append(net.forward_features(torch.flip(x, [3])).numpy())
    return np.concatenate(maps), np.concatenate(mirrored)


def pooled(m: np.ndarray) -> np.ndarray:
    return m.mean(axis=(2, 3))


def halves(m: np.ndarray) -> np.ndarray:
    w = m.shape[3] // 2
    return np.concatenate([pooled(m), pooled(m[..., :w]), pooled(m[..., w:])], axis=1)


def imgclf_head(trainer, xtr, ytr, xte, yte, labels):
    thresholds, _ = _cross_fitted_thresholds(trainer, xtr, ytr, "cpu")
    head, _, _ = train_sigmoid_head(trainer, xtr, ytr, None, None, "cpu", report=False)
    return compute_multilabel_metrics(head_probabilities(head, xte, multilabel=True), yte, labels, thresholds)


def logistic(c: float, seed: int):
    def fit(trainer, xtr, ytr, xte, yte, labels):
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import KFold, cross_val_predict

        out_of_fold, probs = np.zeros_like(ytr), np.zeros(yte.shape, np.float32)
        for j in range(len(labels)):
            model = LogisticRegression(C=c, max_iter=3000)
            folds = KFold(5, shuffle=True, random_state=seed)
            out_of_fold[:, j] = cross_val_predict(model, xtr, ytr[:, j], cv=folds, method="predict_proba")[:, 1]
            probs[:, j] = model.fit(xtr, ytr[:, j]).predict_proba(xte)[:, 1]
        return compute_multilabel_metrics(probs, yte, labels, choose_thresholds(out_of_fold, ytr))

    return fit


def main() -> None:
    try:
        import sklearn  # noqa: F401

        with_sklearn = True
    except ImportError:
        with_sklearn = False
    results: dict[str, list[tuple[float, float]]] = {}
    for seed in (1, 2, 3):
        tmp = Path(tempfile.mkdtemp())
        manifest = bench.build_set(tmp / "set", seed, 400, 100)
        rows = list(csv.DictReader(open(manifest)))
        labels = sorted({name for r in rows for name in r["label"].split(";")})
        tr = [str(manifest.parent / r["path"]) for r in rows if r["split"] == "train"]
        te = [str(manifest.parent / r["path"]) for r in rows if r["split"] == "test"]
        ytr = label_matrix([r["label"].split(";") for r in rows if r["split"] == "train"], labels).astype(np.float32)
        yte = label_matrix([r["label"].split(";") for r in rows if r["split"] == "test"], labels)
        trainer = ImageClassificationTrainer(seed=seed, progress=False)
        squeezed_tr, _ = feature_maps(tr, (224, 224))
        squeezed_te, _ = feature_maps(te, (224, 224))
        mtr, mtr_mirror = feature_maps(tr, (448, 224))
        mte, mte_mirror = feature_maps(te, (448, 224))
        both_te = (pooled(mte) + pooled(mte_mirror)) / 2
        variants = {
            "squeezed": (imgclf_head, pooled(squeezed_tr), ytr, pooled(squeezed_te)),
            "native": (imgclf_head, pooled(mtr), ytr, pooled(mte)),
            "native + mirror at test": (imgclf_head, pooled(mtr), ytr, both_te),
            "native + mirror in training and at test": (
                imgclf_head, np.concatenate([pooled(mtr), pooled(mtr_mirror)]), np.concatenate([ytr, ytr]), both_te),
            "native, average and max pooled": (
                imgclf_head, np.concatenate([pooled(mtr), mtr.max(axis=(2, 3))], 1), ytr,
                np.concatenate([pooled(mte), mte.max(axis=(2, 3))], 1)),
            "native, whole and halves": (imgclf_head, halves(mtr), ytr, halves(mte)),
        }  # fmt: skip
        if with_sklearn:
            for c in (0.1, 1.0, 10.0):
                variants[f"native, logistic regression C={c:g}"] = (logistic(c, seed), pooled(mtr), ytr, pooled(mte))
        for name, (fit, xtr, y, xte) in variants.items():
            m = fit(trainer, xtr, y, xte, yte, labels)
            results.setdefault(name, []).append((m.mean_average_precision, m.micro_f1))
            print(seed, name, f"mAP {m.mean_average_precision:.4f} micro-F1 {m.micro_f1:.4f}", flush=True)
    print()
    for name, r in results.items():
        maps, f1s = [a for a, _ in r], [b for _, b in r]
        print(f"{name:<42} mAP {statistics.mean(maps):.3f} ({', '.join(f'{a:.3f}' for a in maps)})  "
              f"micro-F1 {statistics.mean(f1s):.3f} ({', '.join(f'{b:.3f}' for b in f1s)})")  # fmt: skip


if __name__ == "__main__":
    main()
