"""Are the class activation maps faithful? A deletion test on held-out photos.

The default model (efficientnet_lite0, head only) on the bundled flowers, 5-fold: each
fold's 40 photos are explained by a model trained on the other 160, so every photo is one
the model never saw. For each photo, on the crop the network sees, the predicted label's
probability is measured unmasked and with 20% of the pixels replaced by the normalisation
mean (zero input):

- **top 20%**: the pixels where the map (bilinear at full crop resolution, as ``--explain``
  writes it) is highest;
- **random cells**: a random 20% made of whole cells at the map's own resolution (7x7 for
  Lite0: 10 of the 49 cells of 32x32 pixels), the mean drop over ``--draws`` seeded draws;
  scattered single pixels are no fair baseline (they damage any image more than one region
  does), but their drop is reported too;
- **lowest 20%**: the pixels where the map is lowest.

The map wins on an image when masking its top 20% lowers the probability more than the
baseline does (compared in float64 log-probabilities, so probabilities that round to 1 in
float32 do not tie). Reported: the share of wins against each random draw and against the
draws' mean probability, and the mean probability drops. Also: the map's top 10 of the 49
cells against the random cells (the same shape of mask, only the cells' choice differs).

    python benchmarks/explain.py                 # about 2 minutes on 2 cores
    python benchmarks/explain.py --fill blur     # masked pixels blurred instead of grey
    python benchmarks/explain.py --map contrast  # the label's map minus the probability-weighted others'
    python benchmarks/explain.py --map smooth    # the map smoothed over neighbouring cells (a receptive field)
    python benchmarks/explain.py --map sharp     # the opposite: the map less its smoothed self (--strength)
    python benchmarks/explain.py --head logistic --C 0.1  # a scikit-learn logistic head in place of imgclf's
    python benchmarks/explain.py --head logistic --C 0.001 --calibrate  # ... with its probabilities calibrated
    python benchmarks/explain.py --weight-decay 0.1   # imgclf's head with L2 weight decay
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from imgclf import ImageClassificationTrainer, load_images_from_directory, sample_data_dir
from imgclf.data.imaging import load_array
from imgclf.inference.explain import _axis_weights
from imgclf.inference.unknown import stratified_folds


def upsampled(cells: np.ndarray, size: int) -> np.ndarray:
    """The (h, w) map at the crop's resolution, bilinear at pixel centres (as the full-size map is)."""
    wy, _ = _axis_weights(size, size, 0, size, cells.shape[0])
    wx, _ = _axis_weights(size, size, 0, size, cells.shape[1])
    return (wy @ cells) @ wx.T


def masks(cells: np.ndarray, size: int, fraction: float, draws: int, rng) -> dict[str, list[np.ndarray]]:
    """Boolean (size, size) masks of the pixels to delete, by strategy."""
    values = upsampled(cells, size).ravel()
    n = int(round(fraction * size * size))
    order = np.argsort(values, kind="stable")
    top, low = np.zeros(size * size, bool), np.zeros(size * size, bool)
    top[order[-n:]] = True
    low[order[:n]] = True
    h, w = cells.shape
    per_cell = int(round(fraction * h * w))
    rows = np.minimum((np.arange(size) * h) // size, h - 1)
    cols = np.minimum((np.arange(size) * w) // size, w - 1)
    cell_of = rows[:, None] * w + cols[None, :]
    random_cells = [np.isin(cell_of, rng.choice(h * w, per_cell, replace=False)) for _ in range(draws)]
    scattered = []
    for _ in range(draws):
        pick = np.zeros(size * size, bool)
        pick[rng.choice(size * size, n, replace=False)] = True
        scattered.append(pick.reshape(size, size))
    ranked = np.argsort(cells.ravel(), kind="stable")
    top_cells = np.isin(cell_of, ranked[-per_cell:])
    return {"top": [top.reshape(size, size)], "top cells": [top_cells], "random cells": random_cells,
            "lowest": [low.reshape(size, size)], "scattered pixels": scattered}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--draws", type=int, default=5, help="random masks per image (their mean drop)")
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workspace", default=None, help="feature cache (default: imgclf's)")
    parser.add_argument("--fill", choices=("mean", "blur", "black"), default="mean",
                        help="what masked pixels become: the normalisation mean, the image Gaussian-blurred (sigma 8 pixels), or black")
    parser.add_argument("--map", choices=("cam", "contrast", "smooth", "sharp"), default="cam",
                        help="cam: W_c . F + b_c; contrast: that minus the probability-weighted maps of all labels; "
                             "smooth: the cam Gaussian-smoothed over the cells (--sigma cells; its minimum outside); "
                             "sharp: the cam plus --strength times (the cam less its --sigma smoothing)")
    parser.add_argument("--sigma", type=float, default=1.0, help="--map smooth/sharp: the smoothing, in cells")
    parser.add_argument("--strength", type=float, default=1.0, help="--map sharp: how much sharper")
    parser.add_argument("--head", choices=("imgclf", "logistic"), default="imgclf",
                        help="logistic: the head refitted by scikit-learn's LogisticRegression (--C) on the same features")
    parser.add_argument("--C", type=float, default=1.0, help="--head logistic: inverse L2 strength")
    parser.add_argument("--calibrate", action="store_true",
                        help="--head logistic: divide its logits by the temperature that minimises the log-loss of "
                             "its out-of-fold logits on the training photos (5-fold)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="imgclf's head: L2 weight decay")
    args = parser.parse_args()
    started = time.perf_counter()
    flowers = load_images_from_directory(sample_data_dir("flowers"))
    labels = sorted({im.label for im in flowers})
    y = np.array([labels.index(im.label) for im in flowers])
    rng = np.random.default_rng(args.seed)
    drops: dict[str, list[np.ndarray]] = {}  # per image: the probability drop of each mask
    worse: dict[str, list[np.ndarray]] = {}  # per image: the log-probability drop of each mask
    cells_shape = None
    right, log_loss = [], []  # the model's own quality on the same held-out photos
    for fold in stratified_folds(y, args.folds, seed=args.seed):
        train = [flowers[i] for i in np.setdiff1d(np.arange(len(flowers)), fold)]
        model = ImageClassificationTrainer(workspace=args.workspace, progress=False, precision="fp32",
                                           weight_decay=args.weight_decay).fit(train)  # fmt: skip
        if args.head == "logistic":
            refit_head(model, train, args.C, args.calibrate)
        size = model.preprocessing.input_size
        for i in fold:
            x = load_array(flowers[i].source, model.preprocessing, flowers[i].name)
            fill = {"blur": blurred, "black": black, "mean": np.zeros_like}[args.fill](x)
            _, _, maps = model._explained(x[None])
            logp = log_softmax(maps.mean(axis=(2, 3)))[0]  # the maps' spatial means are the logits
            best = int(logp.argmax())
            right.append(best == y[i])
            log_loss.append(-logp[y[i]])
            cells = maps[0, best]
            if args.map == "contrast":
                probs = np.exp(logp)
                cells = cells - np.tensordot(probs, maps[0], axes=(0, 0))
            elif args.map == "smooth":  # deleting a cell also changes its neighbours' features
                from scipy.ndimage import gaussian_filter

                cells = gaussian_filter(cells.astype(np.float64), args.sigma, mode="constant", cval=float(cells.min()))
            elif args.map == "sharp":  # undo the receptive field's blur: the cells' own evidence, sharper
                from scipy.ndimage import gaussian_filter

                cells = cells.astype(np.float64)
                cells = cells + args.strength * (cells - gaussian_filter(cells, args.sigma, mode="nearest"))
            cells_shape = cells.shape
            batch, owners = [], []
            for strategy, group in masks(cells, size, args.fraction, args.draws, rng).items():
                for mask in group:
                    batch.append(np.where(mask[None], fill, x).astype(np.float32))
                    owners.append(strategy)
            masked = log_softmax(model._explained(np.stack(batch))[2].mean(axis=(2, 3)))[:, best]
            owners = np.asarray(owners)
            for strategy in dict.fromkeys(owners):
                mine = masked[owners == strategy]
                worse.setdefault(strategy, []).append(logp[best] - mine)
                drops.setdefault(strategy, []).append(np.exp(logp[best]) - np.exp(mine))
    top = np.concatenate(worse["top"])
    n = len(top)
    print(f"Deletion test: default model (head only), {args.folds}-fold over the {n} bundled flowers, each "
          f"explained by a model that never saw it; {args.fraction:.0%} of the crop masked ({args.fill} fill); "
          f"map {cells_shape[0]}x{cells_shape[1]}; random masks: {args.draws} seeded draws per image\n")
    print(f"{'masked':<18} {'mean prob. drop':>15}  {'top 20% drops more: than each draw':>36}  {'than their mean':>16}")
    for strategy in ("top", "random cells", "lowest", "scattered pixels", "top cells"):
        name = {"top": "map's top 20%", "lowest": "map's lowest 20%", "top cells": "map's top cells"}.get(
            strategy, strategy)  # fmt: skip
        mean_drop = float(np.mean(np.concatenate(drops[strategy])))
        if strategy == "top":
            print(f"{name:<18} {mean_drop:>15.3f}")
            continue
        if strategy == "top cells":  # the same cells, ranked by the map, against the random cells
            top = np.concatenate(worse["top cells"])
            strategy = "random cells"
            name = "random cells, vs the map's top 10 of 49 cells"
            print(f"{'map top cells':<18} {float(np.mean(np.concatenate(drops['top cells']))):>15.3f}")
        theirs = np.stack(worse[strategy])  # (images, draws), log-probability drops
        each = top[:, None] > theirs
        pairs = f"{int(each.sum())}/{each.size} ({each.mean():.0%})"
        vs_mean = top > np.log(np.mean(np.exp(-theirs), axis=1)) * -1  # against the draws' mean probability
        print(f"{name:<18} {mean_drop:>15.3f}  {pairs:>36}  {int(vs_mean.sum())}/{n} ({vs_mean.mean():.0%})")
    print(f"\nThe models on the same held-out photos: accuracy {np.mean(right):.3f}, log-loss {np.mean(log_loss):.3f}")
    print(f"{time.perf_counter() - started:.0f} s")
    return 0


def refit_head(model, train, c: float, calibrate: bool = False) -> None:
    """Replace ``model``'s head by a multinomial logistic regression fitted on the
    training photos' pooled features (the issue's reference head); ``calibrate`` divides its
    weights by the temperature that fits its out-of-fold logits best (the same ranking and maps,
    probabilities as sharp as the data support)."""
    import torch
    from scipy.optimize import minimize_scalar
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    backbone = model.backbone.eval()
    with torch.no_grad():
        x = np.concatenate([backbone(torch.from_numpy(np.stack([load_array(im.source, model.preprocessing, im.name)
                                                                 for im in train[k:k + 32]]))).numpy()
                            for k in range(0, len(train), 32)])  # fmt: skip
    y = [model.labels.index(im.label) for im in train]
    temperature = 1.0
    if calibrate:
        folds = StratifiedKFold(5, shuffle=True, random_state=0)
        logits = cross_val_predict(LogisticRegression(C=c, max_iter=2000), x, y, cv=folds, method="decision_function")
        rows = np.arange(len(y))
        temperature = minimize_scalar(lambda t: -log_softmax(logits / t)[rows, y].mean(), bounds=(1e-3, 100),
                                      method="bounded").x  # fmt: skip
    fitted = LogisticRegression(C=c, max_iter=2000).fit(x, y)
    with torch.no_grad():
        model.head.weight.copy_(torch.from_numpy((fitted.coef_ / temperature).astype(np.float32)))
        model.head.bias.copy_(torch.from_numpy((fitted.intercept_ / temperature).astype(np.float32)))


def black(x: np.ndarray) -> np.ndarray:
    """Black pixels in the network's normalised space (the usual deletion-metric fill)."""
    from imgclf.nets.archs import get_architecture, preprocessing_for

    prep = preprocessing_for(get_architecture("efficientnet_lite0"))
    return np.broadcast_to((-np.asarray(prep.mean) / np.asarray(prep.std))[:, None, None], x.shape).astype(x.dtype)


def blurred(x: np.ndarray, radius: float = 16) -> np.ndarray:
    """Each channel of the (3, S, S) input Gaussian-blurred (sigma radius / 2): a fill that keeps the colours and loses the detail."""
    from scipy.ndimage import gaussian_filter

    return np.stack([gaussian_filter(c, radius / 2, mode="nearest") for c in x]).astype(np.float32)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities in float64: no ties where float32 probabilities round to 1."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


if __name__ == "__main__":
    raise SystemExit(main())
