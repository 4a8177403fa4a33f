"""The data audit: what is wrong with a folder of labelled images, found before training on it.

``audit(folder)`` takes what ``imgclf train`` takes (a folder of label subfolders, a
train/val/test folder of them, or a manifest: ``imgclf.data.layouts``), reads every image once (hash, size, a small thumbnail, a
perceptual hash), takes backbone features from the workspace cache (computing
only those missing, so a second audit of the same folder is fast), and
reports: per-label counts, unreadable files, tiny, extreme or nearly blank
images, exact and near-duplicates (``imgclf.insight.neardup``), leaks into
``against`` or across the split ``imgclf train`` would make, suspected label
errors and outliers (``imgclf.insight.labels``). For an input with train/val/test parts, leaks
are copies across its parts; for a manifest, the rows listing a file twice are listed too.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from imgclf.data.images import ImageData, content_hash
from imgclf.data.imaging import open_image
from imgclf.data.layouts import load_dataset, tagged
from imgclf.data.parallel import ordered_map
from imgclf.data.splits import train_test_split
from imgclf.errors import ImageDecodeError
from imgclf.insight import labels as label_model
from imgclf.insight import neardup
from imgclf.insight.findings import MAX_LISTED as MAX_LISTED  # still importable from here
from imgclf.insight.findings import AuditResult
from imgclf.options import DEFAULT_ARCH, validate

TINY_SIDE = 32  # pixels: a side shorter than this carries almost nothing after resizing to the network's input
EXTREME_ASPECT = 4.0  # longer side / shorter side beyond which the centre crop loses most of the picture
BLANK_STD = 3.0  # standard deviation of the grey levels (0-255) below which an image is one flat colour


@dataclass
class _Scan:
    """What one read of a file tells, before any network runs."""

    name: str
    label: str | None
    digest: str | None = None
    error: str | None = None
    width: int = 0
    height: int = 0
    thumb: np.ndarray | None = None
    phash: np.ndarray | None = None
    grey_std: float = 0.0
    picture: Image.Image | None = None  # kept only for the calibration sample


def _scan(image: ImageData, keep_picture: bool) -> _Scan:
    scan = _Scan(image.name, image.label)
    try:
        data = image.read_bytes()
    except OSError as e:
        scan.error = f"cannot read file ({e.strerror or e})"
        return scan
    scan.digest = content_hash(data)
    try:
        picture = open_image(data, image.name, draft_size=neardup.THUMB)
        with Image.open(io.BytesIO(data)) as header:
            scan.width, scan.height = header.size
    except ImageDecodeError as e:
        message = str(e)
        scan.error = message[len(image.name) + 2 :] if message.startswith(f"{image.name}: ") else message
        return scan
    scan.thumb = neardup.thumbnail(picture)
    scan.phash = neardup.perceptual_hash(scan.thumb)
    scan.grey_std = float(scan.thumb.std())
    if keep_picture:
        scan.picture = picture
    return scan


def _blas_one_thread():
    """The audit's matrix products are many and small: BLAS threads cost more than they give."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # only slower without it
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


class _SourceChanged(Exception):
    """The weights came from elsewhere than the cache key said; extraction restarts under the right key."""


class _LazyEngine:
    """Builds the backbone and its engine only when an image is missing from the cache.

    A second audit of the same folder then needs neither torch's model nor the ONNX export.
    """

    def __init__(self, architecture, weights, input_size: int, device: str, expected_source: str):
        self.architecture, self.weights, self.input_size = architecture, weights, input_size
        self.device, self.expected_source = device, expected_source
        self.engine = None

    def __call__(self, arrays: np.ndarray) -> np.ndarray:
        if self.engine is None:
            from imgclf.nets.archs import create_backbone
            from imgclf.nets.device import resolve_device
            from imgclf.nets.engines import create_engine

            backbone, source = create_backbone(self.architecture, self.weights)
            if source != self.expected_source:
                raise _SourceChanged(source)
            device = resolve_device(self.device)
            self.engine = create_engine(backbone.to(device), self.input_size, device)
        return self.engine(arrays)


def _weights_source(architecture, weights) -> str:
    """What ``create_backbone`` will say its weights came from (the cache key training uses), without building it."""
    from imgclf.nets.archs import hub_weights_file, package_weights_file

    if weights is not None:
        return f"file {weights}"
    if package_weights_file(architecture) is not None:
        return f"package {architecture.weights_package}"
    return "timm hub cache" if hub_weights_file(architecture) is not None else "timm hub"


def extract_features(
    images: Sequence[ImageData],
    *,
    arch: str,
    weights: str | Path | None,
    workspace: str | Path | None,
    device: str,
    progress: bool,
):
    """Backbone features as training computes them, from (and into) the same workspace cache."""
    from imgclf.nets.archs import get_architecture, preprocessing_for
    from imgclf.nets.features import FeatureExtractor

    architecture = get_architecture(arch)
    preprocessing = preprocessing_for(architecture)
    source = _weights_source(architecture, weights)
    for _ in range(2):
        engine = _LazyEngine(architecture, weights, preprocessing.input_size, device, source)
        extractor = FeatureExtractor(
            engine, preprocessing, f"{architecture.name}|{architecture.timm_name}|{source}",
            workspace=workspace, progress=progress,
        )  # fmt: skip
        try:
            return extractor.transform(images)
        except _SourceChanged as changed:
            source = str(changed)
    raise RuntimeError("weights source changed twice while extracting features")


def _relative_names(folder: str | Path, images: list[ImageData]) -> list[str]:
    """Each file as the folder was given, joined with its path inside the folder (a file a
    manifest lists elsewhere, or a URI, as the manifest names it)."""
    root = Path(folder)
    names = []
    for im in images:
        try:
            names.append(os.path.join(str(folder), str(Path(im.name).relative_to(root))))
        except ValueError:
            names.append(im.name)
    return names


def _exact_groups(scans: list[_Scan], members: Sequence[int]) -> list[list[int]]:
    by_digest: dict[str, list[int]] = defaultdict(list)
    for i in members:
        if scans[i].thumb is not None:
            by_digest[scans[i].digest].append(i)
    return [g for g in by_digest.values() if len(g) > 1]


def _weakest(edges: dict[tuple[int, int], float], group: Sequence[int]) -> float:
    inside = set(group)
    values = [v for (a, b), v in edges.items() if a in inside and b in inside]
    return float(min(values)) if values else 1.0


def audit(
    folder: str | Path,
    against: str | Path | None = None,
    *,
    arch: str = DEFAULT_ARCH,
    weights: str | Path | None = None,
    workspace: str | Path | None = None,
    use_cache: bool = True,
    device: str = "auto",
    test_fraction: float = 0.2,
    seed: int = 1,
    folds: int = 5,
    progress: bool = True,
    path_column: str | None = None,
    label_column: str | None = None,
    label_map: str | Path | None = None,
) -> AuditResult:
    """Audit the labelled ``folder`` (one subfolder per label, a train/val/test folder of them, or a
    manifest), optionally against a test folder.

    ``test_fraction`` and ``seed`` are those of ``imgclf train``: without ``against``, leaks are
    duplicates the training split would put on both sides, or, when ``folder`` has its own
    parts, duplicates across them. ``path_column``, ``label_column`` and ``label_map``: a
    manifest's, as ``train`` reads them. Raises :class:`DataError` for a missing or empty folder
    or an unusable manifest; everything found in the images is reported, not raised.
    """
    from imgclf.nets.workspace import default_workspace

    validate("audit", {"test_fraction": test_fraction, "seed": seed, "folds": folds, "device": device})
    timing: dict[str, float] = {}
    started = time.perf_counter()
    dataset = load_dataset(folder, path_column=path_column, label_column=label_column, label_map=label_map)
    images, parts = tagged(dataset)
    names = _relative_names(folder, images)
    images = [ImageData(im.source, im.label, name) for im, name in zip(images, names)]
    n_folder = len(images)
    has_parts = against is None and len(dataset.parts) > 1
    if against is not None:
        test_images = load_dataset(against).images
        test_names = _relative_names(against, test_images)
        images += [ImageData(im.source, im.label, name) for im, name in zip(test_images, test_names)]
    in_folder = np.arange(len(images)) < n_folder

    rng = random.Random(seed)
    sample = set(rng.sample(range(n_folder), min(neardup.CALIBRATION_SAMPLE, n_folder)))
    scans = list(ordered_map(lambda item: _scan(item[1], item[0] in sample), enumerate(images)))
    timing["read_seconds"] = time.perf_counter() - started

    readable = [i for i, s in enumerate(scans) if s.thumb is not None]
    t = time.perf_counter()
    workspace = (workspace or default_workspace()) if use_cache else None
    extraction = extract_features([images[i] for i in readable], arch=arch, weights=weights, workspace=workspace,
                                  device=device, progress=progress)  # fmt: skip
    timing["features_seconds"] = time.perf_counter() - t
    features = {readable[k]: row for k, row in zip(extraction.kept, extraction.features)}
    for k, reason in extraction.failures:  # decodable by Pillow for the scan, not for the network's preprocessing
        i = next(j for j in readable if images[j].name == k)
        scans[i].error, scans[i].thumb = reason, None
    usable = [i for i in readable if i in features]

    with _blas_one_thread():
        t = time.perf_counter()
        # one representative per distinct content; exact copies are reported as such
        representative: dict[str, int] = {}
        for i in usable:
            representative.setdefault(scans[i].digest, i)
        reps = sorted(representative.values())
        found = neardup.find_near_duplicates(
            np.stack([scans[i].thumb for i in reps]) if reps else np.zeros((0, neardup.THUMB, neardup.THUMB), np.uint8),
            np.stack([scans[i].phash for i in reps]) if reps else np.zeros((0, 64), bool),
            np.stack([features[i] for i in reps]) if reps else None,
            [scans[i].picture for i in sorted(sample) if scans[i].picture is not None],
        )
        for s in scans:
            s.picture = None
        near_edges = {(reps[a], reps[b]): float(v) for (a, b), v in zip(found.pairs, found.similarity)}
        twins: dict[int, list[int]] = defaultdict(list)  # representative -> every file with its content
        for i in usable:
            twins[representative[scans[i].digest]].append(i)
        timing["duplicates_seconds"] = time.perf_counter() - t

        folder_usable = [i for i in usable if in_folder[i]]
        duplicates, group_of = _duplicate_findings(scans, folder_usable, near_edges, twins, in_folder)
        leaks = _leak_findings(scans, images, usable, near_edges, twins, in_folder, against is not None,
                               group_of, test_fraction, seed, n_folder, parts if has_parts else None)  # fmt: skip

        t = time.perf_counter()
        label_issues, outliers, label_note = _label_findings(scans, folder_usable, features, group_of, folds, seed)
        timing["labels_seconds"] = time.perf_counter() - t

    problems = _image_problems(scans, in_folder)
    counts: dict[str, int] = defaultdict(int)
    for i in folder_usable:
        counts[scans[i].label] += 1
    timing["total_seconds"] = time.perf_counter() - started
    method = {
        "arch": arch,
        "features": {"extracted": extraction.extracted, "cached": extraction.cached},
        "near_duplicates": {
            "threshold": round(found.threshold.similarity, 5),
            "copy_distance": round(found.threshold.copy_distance, 5),
            "neighbour_distance": round(found.threshold.neighbour_distance, 5),
            "copies_scored": found.threshold.copies_scored,
            "pairs_verified": found.candidates,
        },
        "label_issues": label_note,
        "split": None if against is not None else {"test_fraction": test_fraction, "seed": seed},
        "layout": dataset.layout,
    }
    if has_parts:
        method["split"] = {"parts": {part: len(members) for part, members in dataset.parts}}
    return AuditResult(
        folder=str(folder), against=None if against is None else str(against),
        labels=dict(sorted(counts.items())),
        unreadable=[{"file": s.name, "reason": s.error} for i, s in enumerate(scans) if s.error and in_folder[i]],
        image_problems=problems, duplicates=duplicates, leaks=leaks, label_issues=label_issues, outliers=outliers,
        method=method, timing={k: round(v, 3) for k, v in timing.items()}, duplicate_rows=dataset.duplicate_rows,
    )  # fmt: skip


def _duplicate_findings(scans, members, near_edges, twins, in_folder):
    """Exact groups (same bytes) and near groups (verified pairs, exact copies folded in), cross-label first.

    Also returns a group id per image, so the label model keeps copies in one fold.
    """
    findings = []
    for group in _exact_groups(scans, members):
        findings.append({"kind": "exact", "files": [scans[i].name for i in group],
                         "labels": sorted({scans[i].label for i in group}), "similarity": 1.0})  # fmt: skip
    member_set = set(members)
    reps = sorted({r for r, files in twins.items() if any(f in member_set for f in files)})
    index = {r: k for k, r in enumerate(reps)}
    inside = {(a, b): v for (a, b), v in near_edges.items() if a in index and b in index}
    for group in neardup.groups_of(len(reps), np.array([(index[a], index[b]) for a, b in inside]).reshape(-1, 2)):
        files = [f for k in group for f in twins[reps[k]] if f in member_set]
        findings.append({"kind": "near", "files": [scans[i].name for i in sorted(files)],
                         "labels": sorted({scans[i].label for i in files}),
                         "similarity": round(_weakest(inside, [reps[k] for k in group]), 5)})  # fmt: skip
    for f in findings:
        f["cross_label"] = len(f["labels"]) > 1
    findings.sort(key=lambda f: (not f["cross_label"], f["kind"] != "exact", f["files"][0]))
    group_of = {i: i for i in members}
    name_to_index = {scans[i].name: i for i in members}
    for k, f in enumerate(findings):
        for name in f["files"]:
            group_of[name_to_index[name]] = -1 - k
    return findings, group_of


def _leak_findings(scans, images, usable, near_edges, twins, in_folder, has_against, group_of, test_fraction, seed,
                   n_folder, parts=None):  # fmt: skip
    """Copies across FOLDER and ``against``; without ``against``, across FOLDER's own parts (``parts``:
    each image's), or across the split ``train`` would make."""
    if has_against:
        left = {i for i in usable if in_folder[i]}
        right = {i for i in usable if not in_folder[i]}
        where = "against"
    elif parts is not None:
        left = {i for i in usable if parts[i] == "train"}
        right = {i for i in usable if parts[i] != "train"}
        where = "train/{part} parts"
    else:
        # as `imgclf train` splits: the readable images only (unreadable ones are dropped first)
        train, test = train_test_split([images[i] for i in usable if in_folder[i]], test_fraction, seed)
        test_names = {im.name for im in test}
        left = {i for i in usable if in_folder[i] and images[i].name not in test_names}
        right = {i for i in usable if in_folder[i] and images[i].name in test_names}
        where = "train/test split"
    leaks = []
    seen = set()
    rep_of = {f: r for r, files in twins.items() for f in files}
    for i in sorted(left):
        for j in sorted(right):
            if scans[i].digest == scans[j].digest:
                leaks.append((i, j, "exact", 1.0))
                seen.add((i, j))
    for (a, b), v in near_edges.items():
        for i in twins[a] + twins[b]:
            for j in twins[a] + twins[b]:
                if i in left and j in right and (i, j) not in seen and rep_of[i] != rep_of[j]:
                    seen.add((i, j))
                    leaks.append((i, j, "near", round(v, 5)))
    leaks.sort(key=lambda x: (x[2] != "exact", scans[x[0]].name, scans[x[1]].name))
    return [{"file": scans[i].name, "against_file": scans[j].name, "kind": kind, "similarity": v,
             "between": where.format(part=parts[j]) if parts is not None else where}
            for i, j, kind, v in leaks]  # fmt: skip


def _label_findings(scans, members, features, group_of, folds, seed):
    names = sorted({scans[i].label for i in members})
    counts = defaultdict(int)
    for i in members:
        counts[scans[i].label] += 1
    if len(names) < 2:
        return [], [], "skipped: fewer than 2 labels"
    k = min(folds, min(counts.values()))
    x = np.stack([features[i] for i in members]) if members else np.zeros((0, 1))
    groups = np.array([group_of[i] for i in members])
    outlier_scores = label_model.outlier_scores(x, groups)
    outliers = [{"file": scans[members[j]].name, "label": scans[members[j]].label,
                 "score": round(float(outlier_scores[j]), 4)} for j in label_model.flag_outliers(outlier_scores)]  # fmt: skip
    if k < 2:
        return [], outliers, "skipped: a label has fewer than 2 readable images"
    y = np.array([names.index(scans[i].label) for i in members])
    probs = label_model.out_of_fold_probabilities(x, y, len(names), groups, folds=k, seed=seed)
    issues = [{"file": scans[members[issue.index]].name, "given": names[y[issue.index]],
               "suggested": names[issue.suggested], "confidence": round(issue.confidence, 4),
               "given_probability": round(issue.given_probability, 4),
               "suggested_probability": round(issue.suggested_probability, 4)}
              for issue in label_model.confident_learning(probs, y)]  # fmt: skip
    accuracy = float((probs.argmax(1) == y).mean())
    return (
        issues,
        outliers,
        f"{k}-fold softmax regression on the backbone features; out-of-fold accuracy {accuracy:.3f}",
    )


def _image_problems(scans, in_folder) -> list[dict]:
    problems = []
    for i, s in enumerate(scans):
        if s.thumb is None or not in_folder[i]:
            continue
        short, long = sorted((s.width, s.height))
        if short < TINY_SIDE:
            problems.append({"file": s.name, "problem": "tiny", "detail": f"{s.width}x{s.height} pixels"})
        if short and long / short > EXTREME_ASPECT:
            problems.append({"file": s.name, "problem": "extreme aspect ratio",
                             "detail": f"{s.width}x{s.height} ({long / short:.1f}:1)"})  # fmt: skip
        if s.grey_std < BLANK_STD:
            problems.append({"file": s.name, "problem": "nearly blank",
                             "detail": f"grey levels vary by {s.grey_std:.1f} of 255"})  # fmt: skip
    return problems


def training_warning(
    train: Sequence[ImageData],
    held_out: Sequence[ImageData] = (),
    validation: Sequence[ImageData] = (),
    calibration_images: int = 12,
) -> str | None:
    """One line for ``imgclf train`` when the folder has copies under two labels, or copies of training
    images among the held-out or validation images; None when it has neither.

    Cheap (no network): exact hashes, and pHash neighbours verified by pixels as in the audit.
    """
    everything = [*train, *held_out, *validation]
    if len(everything) < 2:
        return None
    sample = set(random.Random(0).sample(range(len(train)), min(calibration_images, len(train))))
    scans = list(ordered_map(lambda item: _scan(item[1], item[0] in sample), enumerate(everything)))
    ok = [i for i, s in enumerate(scans) if s.thumb is not None]
    with _blas_one_thread():
        found = neardup.find_near_duplicates(
            np.stack([scans[i].thumb for i in ok]), np.stack([scans[i].phash for i in ok]), None,
            [scans[i].picture for i in sorted(sample) if scans[i].picture is not None], always_calibrate=False,
        )  # fmt: skip
    pairs = {(ok[a], ok[b]) for a, b in found.pairs}
    by_digest: dict[str, list[int]] = defaultdict(list)
    for i in ok:
        by_digest[scans[i].digest].append(i)
    for group in by_digest.values():
        pairs |= {(a, b) for a in group for b in group if a < b}
    n_train, n_held = len(train), len(held_out)
    part = ["train" if i < n_train else "held-out" if i < n_train + n_held else "validation" for i in range(len(scans))]
    cross = [g for g in neardup.groups_of(len(scans), np.array(sorted(pairs)).reshape(-1, 2))
             if len({scans[i].label for i in g if part[i] == "train"}) > 1]  # fmt: skip
    leaks = Counter(part[j] if part[i] == "train" else part[i] for i, j in pairs if "train" in (part[i], part[j])
                    and part[i] != part[j])  # fmt: skip
    said = []
    if cross:
        said.append(f"{len(cross)} group(s) of copies filed under different labels")
    said += [f"{count} copies of training images in the {where} images" for where, count in sorted(leaks.items())]
    if not said:
        return None
    return "the training folder has " + " and ".join(said) + "; `imgclf audit FOLDER` shows them"
