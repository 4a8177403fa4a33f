"""Near-duplicates: cheap signals find candidate pairs, the pixels decide.

Neither signal alone works (measured in ``benchmarks/audit.py``). Pooled
backbone features put distinct MRI slices closer than a re-encoded copy is to
its original; a perceptual hash survives re-encoding and resizing but a 5 %
crop moves it by up to 28 of its 64 bits, and MRI slices that share a layout
sit within 2 bits of each other. So:

1. **Candidates**: each image's 5 nearest images by cosine of the backbone
   features (ranks, not a threshold, so the scale of the features does not
   matter), plus its nearest images by pHash within 10 of 64 bits.
2. **Verification**: each image is kept as a 128 x 128 grayscale thumbnail.
   For a pair, one image is taken to be a crop of the other (up to 10 % off
   each side): the crop window is picked from row and column profiles on a
   grid, climbed on half-size pictures, and refined on full-size ones by
   coordinate search; the score is the correlation of the two 32 x 32
   area-resampled, lightly blurred pictures, both ways round, the better one.
   It ignores brightness and contrast, so a copy with its levels changed is a
   near-duplicate too.
3. **A threshold from the folder itself** (``choose_threshold``): copies are
   made of 40 of the folder's own images (JPEG quality 50, resized to 90 % and
   110 %, 5 % cropped in the centre and at a corner) to see how far copies
   fall from their original here, and the distance at which the closest 5 %
   of images have their nearest neighbour says how close distinct images come.
   Photos get a loose threshold (0.98); MRI slices, where neighbouring slices
   score 0.996, get 0.9966.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

THUMB = 128  # side of the grayscale thumbnail kept per image (16 KB as uint8)
COMPARE = 32  # side at which aligned thumbnails are compared
MAX_CROP = 0.10  # largest crop per side that verification searches
STEP = 0.0125  # grid step of the crop search (a fraction of the side)
REFINE_STEPS = (STEP / 2, STEP / 4, STEP / 8)
REFINE_ABOVE = 0.97  # coarse score from which a pair's crop window is refined (copies score >= 0.99)
CALIBRATION_SAMPLE = 30  # images of the folder copied to see what copies score here
COPY_FACTOR, NEIGHBOUR_FACTOR, NEIGHBOUR_QUANTILE = 2.0, 0.4, 0.05
LOOSEST = 0.02  # the threshold's largest distance (1 - similarity)


def thumbnail(img: Image.Image) -> np.ndarray:
    """(THUMB, THUMB) uint8 grayscale; the aspect ratio is not kept (crops are searched in fractions)."""
    return np.asarray(img.convert("L").resize((THUMB, THUMB), Image.Resampling.BOX), dtype=np.uint8)


def perceptual_hash(thumb: np.ndarray) -> np.ndarray:
    """pHash (DCT of a 32 x 32 picture) of a thumbnail, as 64 booleans."""
    import imagehash

    return imagehash.phash(Image.fromarray(thumb)).hash.reshape(-1).astype(bool)


def hash_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between rows of two (n, 64) boolean arrays."""
    sa = a.astype(np.float32) * 2 - 1
    sb = b.astype(np.float32) * 2 - 1
    return np.rint((a.shape[1] - sa @ sb.T) / 2).astype(np.int16)


def candidate_pairs(
    features: np.ndarray | None,
    hashes: np.ndarray,
    *,
    neighbours: int = 5,
    hash_radius: int = 10,
    chunk: int = 1024,
) -> np.ndarray:
    """(P, 2) index pairs ``i < j`` worth verifying: feature neighbours and pHash neighbours."""
    n = len(hashes)
    found: set[tuple[int, int]] = set()
    unit = None
    if features is not None and n > 1:
        unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    k = min(neighbours, n - 1)
    for start in range(0, n, chunk):
        rows = np.arange(start, min(n, start + chunk))
        lists = []
        if unit is not None and k > 0:
            sims = unit[rows] @ unit.T
            sims[np.arange(len(rows)), rows] = -np.inf
            lists.append(np.argpartition(-sims, k - 1, axis=1)[:, :k])
        dist = hash_distances(hashes[rows], hashes).astype(np.float32)
        dist[np.arange(len(rows)), rows] = np.inf
        kh = min(2 * neighbours, n - 1)
        if kh > 0:
            near = np.argpartition(dist, kh - 1, axis=1)[:, :kh]
            near = np.where(np.take_along_axis(dist, near, 1) <= hash_radius, near, -1)
            lists.append(near)
        for r, i in enumerate(rows):
            for js in lists:
                for j in js[r]:
                    if j >= 0 and j != i:
                        found.add((min(i, int(j)), max(i, int(j))))
    return np.array(sorted(found), dtype=np.int64).reshape(-1, 2)


def _cell_weights(start: np.ndarray, end: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Box-filter taps that resample the window [start, end) (fractions of ``side``) to COMPARE cells.

    Returns source indices and weights, both (P, COMPARE, taps): a cell covers at most
    side / COMPARE pixels, so a handful of taps replaces a dense (COMPARE x side) matrix.
    """
    taps = side // COMPARE + 2
    cells = np.arange(COMPARE + 1) / COMPARE
    edges = (start[:, None] + (end - start)[:, None] * cells) * side  # (P, COMPARE + 1)
    lo, hi = edges[:, :-1, None], edges[:, 1:, None]
    index = np.floor(lo).astype(np.intp) + np.arange(taps)  # (P, COMPARE, taps)
    weight = np.clip(np.minimum(hi, index + 1) - np.maximum(lo, index), 0, None)
    weight /= np.maximum(weight.sum(-1, keepdims=True), 1e-9)
    return np.clip(index, 0, side - 1), weight.astype(np.float32)


def _resample_rows(pictures: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """(P, H, W) -> (P, COMPARE, W): the rows of the window [start, end) of each picture."""
    index, weight = _cell_weights(start, end, pictures.shape[1])
    taken = pictures[np.arange(len(pictures))[:, None, None], index]  # (P, COMPARE, taps, W)
    return np.einsum("pctw,pct->pcw", taken, weight)


def _resample_cols(pictures: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """(P, H, W) -> (P, H, COMPARE): the columns of the window [start, end) of each picture."""
    return np.swapaxes(_resample_rows(np.swapaxes(pictures, 1, 2), start, end), 1, 2)


def _unit(x: np.ndarray) -> np.ndarray:
    """Each (COMPARE, COMPARE) picture blurred by a [1 2 1] / 4 kernel, centred and scaled to norm 1.

    The blur takes away most of the difference that resampling makes between a copy and its
    original, and less of what tells two different pictures apart (adjacent MRI slices).
    """
    for axis in (1, 2):
        x = np.swapaxes(x, 1, axis)
        y = 0.5 * x
        y[:, 1:] += 0.25 * x[:, :-1]
        y[:, :-1] += 0.25 * x[:, 1:]
        y[:, 0] += 0.25 * x[:, 0]
        y[:, -1] += 0.25 * x[:, -1]
        x = np.swapaxes(y, 1, axis)
    x = x - x.mean(axis=(-2, -1), keepdims=True)
    norm = np.sqrt((x * x).sum(axis=(-2, -1), keepdims=True))
    flat = norm < COMPARE * 0.5  # grey levels varying by less than half a level: rounding noise, no structure
    return np.where(flat, 0.0, x / np.maximum(norm, 1e-6))


def _correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=(-2, -1))


# The coarse search tries a grid of crop windows, picked by row and column profiles on half-size
# pictures; the refinement moves each edge by ever smaller steps on the full-size ones.
_COARSE = THUMB // 2
_EDGES = np.arange(0, MAX_CROP + 1e-9, STEP)
_WINDOWS = np.array([(s, e) for s in _EDGES for e in 1 - _EDGES if e - s >= 1 - MAX_CROP - 1e-9])


def _window_bank(side: int) -> np.ndarray:
    """(side, W * COMPARE): a profile of ``side`` values times this gives its resampling through every window."""
    index, weight = _cell_weights(_WINDOWS[:, 0], _WINDOWS[:, 1], side)
    bank = np.zeros((len(_WINDOWS), COMPARE, side), np.float32)
    np.put_along_axis(
        bank.reshape(-1, side), index.reshape(-1, index.shape[-1]), weight.reshape(-1, index.shape[-1]), 1
    )
    return bank.reshape(-1, side).T


_BANK = _window_bank(_COARSE)


@dataclass
class _Prepared:
    """Per-image pictures the search reuses across all of that image's pairs."""

    full: np.ndarray  # (n, THUMB, THUMB) float32
    half: np.ndarray  # (n, _COARSE, _COARSE) float32
    target: np.ndarray  # (n, COMPARE, COMPARE): the whole picture, blurred, centred, norm 1
    half_target: np.ndarray  # the same from the half-size picture (the coarse search compares like with like)
    col_windows: np.ndarray  # (n, W, COMPARE): the column profile resampled through each crop window
    row_windows: np.ndarray  # (n, W, COMPARE)


def _prepare(thumbs: np.ndarray) -> _Prepared:
    full = thumbs.astype(np.float32)
    n = len(full)
    half = full.reshape(n, _COARSE, 2, _COARSE, 2).mean(axis=(2, 4))
    zeros, ones = np.zeros(n), np.ones(n)
    target = _unit(_resample_cols(_resample_rows(full, zeros, ones), zeros, ones))
    half_target = _unit(_resample_cols(_resample_rows(half, zeros, ones), zeros, ones))
    col_windows = (half.mean(-2) @ _BANK).reshape(n, len(_WINDOWS), COMPARE)
    row_windows = (half.mean(-1) @ _BANK).reshape(n, len(_WINDOWS), COMPARE)
    return _Prepared(full, half, target, half_target, col_windows, row_windows)


def _profile_pick(profiles: np.ndarray, target: np.ndarray, top: int = 2) -> np.ndarray:
    """Indices of the ``top`` windows whose resampled profile best correlates with ``target``."""
    p = profiles - profiles.mean(-1, keepdims=True)
    t = target - target.mean(-1, keepdims=True)
    corr = (p * t[:, None, :]).sum(-1) / (np.linalg.norm(p, axis=-1) * np.linalg.norm(t, axis=-1)[:, None] + 1e-9)
    return np.argsort(-corr, axis=1)[:, :top]


def _window_score(pictures: np.ndarray, target: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Correlation of ``target`` with each picture's crop window (x0, x1, y0, y1)."""
    rows = _resample_rows(pictures, window[:, 2], window[:, 3])
    return _correlation(_unit(_resample_cols(rows, window[:, 0], window[:, 1])), target)


def _coarse(prep: _Prepared, big: np.ndarray, small: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best score over the grid of crop windows of image ``big`` (half-size pictures), and its window."""
    target = prep.half_target[small]
    pick_x = _profile_pick(prep.col_windows[big], target.mean(-2))
    pick_y = _profile_pick(prep.row_windows[big], target.mean(-1))
    pictures = prep.half[big]
    best = np.full(len(big), -np.inf)
    params = np.zeros((len(big), 4))
    whole = np.tile([0.0, 1.0, 0.0, 1.0], (len(big), 1))
    tries = [whole] + [np.concatenate([_WINDOWS[ix], _WINDOWS[iy]], axis=1) for ix in pick_x.T for iy in pick_y.T]
    for window in tries:
        s = _window_score(pictures, target, window)
        better = s > best
        best = np.where(better, s, best)
        params[better] = window[better]
    return _climb(pictures, target, params, (STEP,), best, sweeps=2)  # profiles of repetitive textures mislead


def _climb(
    big: np.ndarray,
    target: np.ndarray,
    params: np.ndarray,
    steps: Sequence[float],
    best: np.ndarray | None = None,
    sweeps: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Coordinate search of the crop window (x0, x1, y0, y1) from ``params``: each edge moves by
    each of ``steps`` where that raises the score (``sweeps`` rounds per step).

    While the x edges move the rows stay resampled (and the other way round), so each
    try costs one small resampling.
    """
    p = params.copy()
    best = _window_score(big, target, p) if best is None else best.copy()
    for step in steps:
        for _ in range(sweeps):
            for axis in (0, 1):
                lo = 2 * axis
                if axis == 0:
                    fixed = _resample_rows(big, p[:, 2], p[:, 3])  # (P, COMPARE, THUMB)
                else:
                    fixed = _resample_cols(big, p[:, 0], p[:, 1])  # (P, THUMB, COMPARE)
                for k in (lo, lo + 1):
                    for delta in (-step, step):
                        q = p.copy()
                        q[:, k] = np.clip(q[:, k] + delta, 0.0, 1.0)
                        if axis == 0:
                            picture = _resample_cols(fixed, q[:, 0], q[:, 1])
                        else:
                            picture = _resample_rows(fixed, q[:, 2], q[:, 3])
                        v = _correlation(_unit(picture), target)
                        better = (q[:, lo + 1] - q[:, lo] > 0.5) & (v > best)
                        best = np.where(better, v, best)
                        p[better] = q[better]
    return best, p


def _pair_scores(prep: _Prepared, a: np.ndarray, b: np.ndarray, refine_above: float | None) -> np.ndarray:
    """Both ways round on the coarse grid; the better way is refined when it reaches ``refine_above``."""
    forward, forward_window = _coarse(prep, a, b)  # b as a crop of a
    backward, backward_window = _coarse(prep, b, a)
    flip = backward > forward
    best = np.where(flip, backward, forward)
    if refine_above is not None:
        todo = np.flatnonzero(best >= refine_above)
        if len(todo):
            big = np.where(flip, b, a)[todo]
            small = np.where(flip, a, b)[todo]
            window = np.where(flip[:, None], backward_window, forward_window)[todo]
            best[todo] = _climb(prep.full[big], prep.target[small], window, REFINE_STEPS, sweeps=2)[0]
    return best


def aligned_similarity(
    thumbs: np.ndarray, pairs: np.ndarray, refine_above: float | None = REFINE_ABOVE, batch: int = 256
) -> np.ndarray:
    """For each pair, the correlation of the two pictures once one is cropped to fit the other.

    ``thumbs``: (n, THUMB, THUMB) uint8. Pairs scoring at least ``refine_above``
    on the coarse grid get their crop window refined (which only raises the score).
    """
    from imgclf.data.parallel import ordered_map

    if len(pairs) == 0:
        return np.zeros(0)
    used, local = np.unique(pairs, return_inverse=True)
    local = local.reshape(-1, 2)
    prep = _prepare(thumbs[used])
    chunks = [local[i : i + batch] for i in range(0, len(local), batch)]
    scores = ordered_map(lambda chunk: _pair_scores(prep, chunk[:, 0], chunk[:, 1], refine_above), chunks, prefetch=4)
    return np.clip(np.concatenate(list(scores)), -1.0, 1.0)


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def _crop(img: Image.Image, left: float, top: float, right: float, bottom: float) -> Image.Image:
    w, h = img.size
    return img.crop((round(left * w), round(top * h), w - round(right * w), h - round(bottom * h)))


#: The edits calibration (and the benchmark) make: name -> function of an RGB image.
EDITS = {
    "jpeg q50": lambda im: _jpeg(im, 50),
    "resized 90%": lambda im: _jpeg(
        im.resize((max(1, round(im.width * 0.9)), max(1, round(im.height * 0.9))), Image.Resampling.BICUBIC), 85
    ),  # fmt: skip
    "resized 110%": lambda im: _jpeg(
        im.resize((round(im.width * 1.1), round(im.height * 1.1)), Image.Resampling.BICUBIC), 85
    ),  # fmt: skip
    "cropped 5% centre": lambda im: _jpeg(_crop(im, 0.025, 0.025, 0.025, 0.025), 90),
    "cropped 5% corner": lambda im: _jpeg(_crop(im, 0.05, 0.05, 0.0, 0.0), 90),
}


@dataclass
class Threshold:
    """The similarity from which a pair counts as a near-duplicate in one folder, and why."""

    similarity: float
    copy_distance: float  # 98th percentile of 1 - similarity over synthetic copies of the folder's images
    neighbour_distance: float  # 5th percentile of 1 - similarity of an image to its closest other (copies left out)
    copies_scored: int


def copy_distances(pictures: Sequence[Image.Image]) -> np.ndarray:
    """1 - similarity of each of ``pictures`` to each of its ``EDITS``: what a copy looks like here.

    Flat pictures are left out: they have no structure to correlate, so their copies would say nothing.
    """
    thumbs, pairs = [], []
    for img in pictures:
        thumb = thumbnail(img)
        if thumb.std() < 3.0:
            continue
        original = len(thumbs)
        thumbs.append(thumb)
        for edit in EDITS.values():
            pairs.append((original, len(thumbs)))
            thumbs.append(thumbnail(edit(img)))
    if not pairs:
        return np.zeros(0)
    return 1.0 - aligned_similarity(np.stack(thumbs), np.array(pairs), refine_above=-1.0)


def choose_threshold(copies: np.ndarray, nearest: np.ndarray) -> Threshold:
    """The loosest of: ``COPY_FACTOR`` x the distance most synthetic copies stay within, and
    ``NEIGHBOUR_FACTOR`` x the distance at which the closest 5 % of the other images have their
    nearest neighbour (images that are themselves copies left out); never looser than ``LOOSEST``.

    On photos distinct images stay far apart and the threshold sits at ``LOOSEST``; on MRI slices,
    where neighbouring slices come within 0.004, it tightens towards what copies need.
    """
    copy_d = float(np.quantile(copies, 0.98)) if len(copies) else LOOSEST / COPY_FACTOR
    distinct = nearest[nearest > COPY_FACTOR * copy_d]
    near_d = float(np.quantile(distinct, NEIGHBOUR_QUANTILE)) if len(distinct) else 1.0
    distance = min(max(COPY_FACTOR * copy_d, NEIGHBOUR_FACTOR * near_d), LOOSEST)
    return Threshold(1.0 - distance, copy_d, near_d, len(copies))


@dataclass
class NearDuplicates:
    """Verified near-duplicate pairs of one set of images."""

    pairs: np.ndarray  # (P, 2) indices, i < j
    similarity: np.ndarray  # (P,)
    threshold: Threshold
    candidates: int  # pairs verified


def find_near_duplicates(
    thumbs: np.ndarray,
    hashes: np.ndarray,
    features: np.ndarray | None,
    calibration_pictures: Sequence[Image.Image],
    *,
    always_calibrate: bool = True,
) -> NearDuplicates:
    """Candidates, verification and a threshold calibrated on these images (see the module's doc).

    The threshold is never looser than ``1 - LOOSEST``, so when no pair reaches that the answer is
    known without calibrating; ``always_calibrate=False`` then skips it (the threshold reported is
    that bound).
    """
    pairs = candidate_pairs(features, hashes)
    scores = aligned_similarity(thumbs, pairs)
    if not always_calibrate and not (scores >= 1.0 - LOOSEST).any():
        return NearDuplicates(
            pairs[:0], scores[:0], Threshold(1.0 - LOOSEST, float("nan"), float("nan"), 0), len(pairs)
        )
    nearest = np.ones(len(thumbs))
    if len(pairs):
        np.minimum.at(nearest, pairs[:, 0], 1.0 - scores)
        np.minimum.at(nearest, pairs[:, 1], 1.0 - scores)
    threshold = choose_threshold(copy_distances(calibration_pictures), nearest)
    keep = scores >= threshold.similarity
    return NearDuplicates(pairs[keep], scores[keep], threshold, len(pairs))


def groups_of(n: int, pairs: np.ndarray) -> list[list[int]]:
    """Connected components (of at least two) of the graph whose edges are ``pairs``."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        ri, rj = root(int(i)), root(int(j))
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(root(i), []).append(i)
    return [m for m in members.values() if len(m) > 1]
