"""Measured, not shipped: multi-label mosaics with the network run on the 448x224 mosaic as it is
(native aspect; the backbone ends in global average pooling, so it takes any size) against the
mosaic squeezed to 224x224 (today's ``--frame whole``). The same mosaics, rounds, head training
and out-of-fold thresholds as ``benchmarks/multilabel.py`` (its squeezed figures are reproduced
exactly), so the difference is the input alone.

    python benchmarks/multilabel_native.py
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
from imgclf.inference.multilabel import compute_multilabel_metrics, label_matrix
from imgclf.nets.archs import create_backbone, get_architecture, preprocessing_for
from imgclf.training.multilabel import _cross_fitted_thresholds, train_sigmoid_head

torch.set_num_threads(2)
arch = get_architecture("efficientnet_lite0")
prep = preprocessing_for(arch)
net, _ = create_backbone(arch)
net.eval()
mean = torch.tensor(prep.mean).view(3, 1, 1)
std = torch.tensor(prep.std).view(3, 1, 1)


def feats(paths, size):
    out = []
    for i in range(0, len(paths), 32):
        batch = []
        for p in paths[i : i + 32]:
            img = Image.open(p).convert("RGB").resize(size, Image.Resampling.BICUBIC)
            batch.append((torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255 - mean) / std)
        with torch.no_grad():
            out.append(net(torch.stack(batch)).numpy())
    return np.concatenate(out).astype(np.float32)


results = {"squeezed": [], "native": []}
for seed in (1, 2, 3):
    tmp = Path(tempfile.mkdtemp())
    manifest = bench.build_set(tmp / "set", seed, 400, 100)
    rows = list(csv.DictReader(open(manifest)))
    labels = sorted({name for r in rows for name in r["label"].split(";")})
    tr = [r for r in rows if r["split"] == "train"]
    te = [r for r in rows if r["split"] == "test"]
    ytr = label_matrix([r["label"].split(";") for r in tr], labels)
    yte = label_matrix([r["label"].split(";") for r in te], labels)
    trainer = ImageClassificationTrainer(seed=seed, progress=False)
    for name, size in (("squeezed", (224, 224)), ("native", (448, 224))):
        xtr = feats([str(manifest.parent / r["path"]) for r in tr], size)
        xte = feats([str(manifest.parent / r["path"]) for r in te], size)
        thresholds, _ = _cross_fitted_thresholds(trainer, xtr, ytr.astype(np.float32), "cpu")
        head, _, _ = train_sigmoid_head(trainer, xtr, ytr.astype(np.float32), None, None, "cpu", report=False)
        m = compute_multilabel_metrics(head_probabilities(head, xte, multilabel=True), yte, labels, thresholds)
        results[name].append((m.mean_average_precision, m.micro_f1))
        print(seed, name, f"mAP {m.mean_average_precision:.4f} micro-F1 {m.micro_f1:.4f}", flush=True)
for name, r in results.items():
    print(
        name, f"mean mAP {statistics.mean(a for a, _ in r):.4f} mean micro-F1 {statistics.mean(b for _, b in r):.4f}"
    )
