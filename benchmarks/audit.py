"""The data audit measured: near-duplicate precision and recall, label-error ranks, run time.

On each set (the bundled flowers and ``../shared/data/brain-mri-600``):

1. the unmodified folder, audited with a fresh workspace (first run: features computed) and again
   (cached run): run times, and how many near-duplicate groups and label suspects it reports;
2. copies planted from ``--originals`` images per set, with edits *other* than those the audit
   calibrates on (JPEG quality 40 and 75, resized to 85 % and 120 %, 4 % and 7 % crops at random
   places, brightness and contrast changed, resized-and-recompressed): recall per edit (the copy
   lands in its original's group) and precision (accepted pairs touching a planted copy that join
   it to its own original or sibling copies);
3. ``--moved`` images moved to a random other label: the rank of each among the label suspects.

    python benchmarks/audit.py [--brain ../shared/data/brain-mri-600] [--originals 25] [--moved 10]
                               [--sheet docs/audit-brain-mri-groups.png]
"""

from __future__ import annotations

import argparse
import io
import random
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from PIL import Image, ImageEnhance

from imgclf import audit, sample_data_dir
from imgclf.data.imaging import open_image


def _save(img: Image.Image, dest: Path, quality: int = 90) -> None:
    img.convert("RGB").save(dest, "JPEG", quality=quality)


def _crop(img: Image.Image, share: float, rng: random.Random) -> Image.Image:
    """Remove ``share`` of each side's length, split at random between its two ends."""
    w, h = img.size
    left, top = rng.uniform(0, share), rng.uniform(0, share)
    return img.crop((round(left * w), round(top * h), round(w - (share - left) * w), round(h - (share - top) * h)))


EDITS = {
    "jpeg q40": lambda im, rng, dest: _save(im, dest, 40),
    "jpeg q75": lambda im, rng, dest: _save(im, dest, 75),
    "resized 85%": lambda im, rng, dest: _save(
        im.resize((round(im.width * 0.85), round(im.height * 0.85)), Image.Resampling.LANCZOS), dest
    ),  # fmt: skip
    "resized 120%": lambda im, rng, dest: _save(
        im.resize((round(im.width * 1.2), round(im.height * 1.2)), Image.Resampling.BILINEAR), dest
    ),  # fmt: skip
    "cropped 4%": lambda im, rng, dest: _save(_crop(im, 0.04, rng), dest),
    "cropped 7%": lambda im, rng, dest: _save(_crop(im, 0.07, rng), dest),
    "brighter, more contrast": lambda im, rng, dest: _save(
        ImageEnhance.Contrast(ImageEnhance.Brightness(im).enhance(1.12)).enhance(1.1), dest
    ),  # fmt: skip
    "resized 90% + q60": lambda im, rng, dest: _save(
        im.resize((round(im.width * 0.9), round(im.height * 0.9)), Image.Resampling.BICUBIC), dest, 60
    ),  # fmt: skip
}


def files_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in {".jpg", ".jpeg", ".png"})


def timed_audit(folder: Path, workspace: Path, **options):
    started = time.perf_counter()
    result = audit(folder, workspace=workspace, progress=False, **options)
    return result, time.perf_counter() - started


def unmodified(name: str, folder: Path, workspace: Path) -> dict:
    first, t_first = timed_audit(folder, workspace)
    cached, t_cached = timed_audit(folder, workspace)
    near = [d for d in cached.duplicates if d["kind"] == "near"]
    print(f"\n== {name}: {sum(cached.labels.values())} images, unmodified")
    print(f"  first run {t_first:.1f} s ({first.method['features']['extracted']} images through the network), "
          f"cached run {t_cached:.1f} s ({cached.method['features']['cached']} from the cache)")  # fmt: skip
    print(f"    cached run by step: {cached.timing}")
    print(f"  near-duplicate threshold {cached.method['near_duplicates']['threshold']:.4f} "
          f"(copies {cached.method['near_duplicates']['copy_distance']:.5f}, closest 5 % of neighbours "
          f"{cached.method['near_duplicates']['neighbour_distance']:.5f})")  # fmt: skip
    print(f"  exact duplicate groups: {sum(d['kind'] == 'exact' for d in cached.duplicates)}; "
          f"near-duplicate groups: {len(near)}")  # fmt: skip
    for d in near:
        print(f"    {d['similarity']:.5f}  " + "  ".join(Path(f).relative_to(folder).as_posix() for f in d["files"]))
    print(f"  label suspects: {len(cached.label_issues)} ({cached.method['label_issues']}); "
          f"outliers: {len(cached.outliers)}")  # fmt: skip
    for x in cached.label_issues[:10]:
        print(f"    {x['confidence']:.3f}  {Path(x['file']).relative_to(folder).as_posix()} -> {x['suggested']}")
    return {"first": t_first, "cached": t_cached, "near_groups": near, "result": cached}


def planted_copies(name: str, folder: Path, workspace: Path, originals: int, seed: int) -> None:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / name
        shutil.copytree(folder, root, ignore=shutil.ignore_patterns("*.md", "*.txt"))
        chosen = rng.sample(files_of(root), originals)
        copy_of: dict[str, tuple[str, str]] = {}  # copy path -> (original path, edit)
        for k, original in enumerate(chosen):
            picture = open_image(original)
            for e, (edit, make) in enumerate(EDITS.items()):
                dest = original.parent / f"planted-{k:03d}-{e}.jpg"
                make(picture, rng, dest)
                copy_of[str(dest)] = (str(original), edit)
        result, seconds = timed_audit(root, workspace)
        group_of = {f: g for g, d in enumerate(result.duplicates) for f in d["files"]}
        recall: dict[str, list[bool]] = defaultdict(list)
        for copy, (original, edit) in copy_of.items():
            recall[edit].append(copy in group_of and group_of.get(copy) == group_of.get(original))
        family = {copy: original for copy, (original, _) in copy_of.items()} | {o: o for o, _ in copy_of.values()}
        planted_groups = [d for d in result.duplicates if any(f in copy_of for f in d["files"])]
        mixed = [d for d in planted_groups if len({family.get(f, f) for f in d["files"]}) > 1]
        # pair precision: within each reported group touching a planted copy, pairs that belong together
        good = bad = 0
        for d in planted_groups:
            files = d["files"]
            for i in range(len(files)):
                for j in range(i + 1, len(files)):
                    if files[i] in copy_of or files[j] in copy_of:
                        same = family.get(files[i], files[i]) == family.get(files[j], files[j])
                        good, bad = good + same, bad + (not same)
        total = sum(len(v) for v in recall.values())
        found = sum(sum(v) for v in recall.values())
        print(f"\n== {name}: {len(copy_of)} planted copies of {originals} images, {len(EDITS)} edits "
              f"({seconds:.1f} s, threshold {result.method['near_duplicates']['threshold']:.4f})")  # fmt: skip
        print(f"  recall {found}/{total} = {found / total:.3f}; pair precision {good}/{good + bad} = "
              f"{good / max(1, good + bad):.3f}; groups joining different originals: {len(mixed)}")  # fmt: skip
        for edit, hits in recall.items():
            print(f"    {edit:<26} {sum(hits)}/{len(hits)}")
        for d in mixed:
            print("    mixed: " + "  ".join(Path(f).name for f in d["files"]))


def moved_labels(name: str, folder: Path, workspace: Path, moved: int, seed: int) -> list[int | None]:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / name
        shutil.copytree(folder, root, ignore=shutil.ignore_patterns("*.md", "*.txt"))
        labels = sorted(p.name for p in root.iterdir() if p.is_dir())
        planted = {}
        for src in rng.sample(files_of(root), moved):
            label = rng.choice([lbl for lbl in labels if lbl != src.parent.name])
            dest = root / label / src.name
            shutil.move(src, dest)
            planted[str(dest)] = src.parent.name
        result, seconds = timed_audit(root, workspace)
        rank = {x["file"]: (r, x["suggested"]) for r, x in enumerate(result.label_issues)}
        ranks = [rank.get(f, (None, None))[0] for f in planted]
        right = sum(rank.get(f, (None, None))[1] == true for f, true in planted.items())
        print(f"\n== {name}: {moved} images moved to a wrong label ({seconds:.1f} s)")
        print(f"  ranks among {len(result.label_issues)} suspects (0 = first): "
              f"{sorted(r for r in ranks if r is not None)}; not flagged: {sum(r is None for r in ranks)}; "
              f"suggested label right: {right}/{moved}")  # fmt: skip
        found = [r for r in ranks if r is not None]
        if found:
            print(f"  median rank {statistics.median(found):.0f}; within the first {2 * moved}: "
                  f"{sum(r < 2 * moved for r in found)}/{moved}")  # fmt: skip
        return ranks


def contact_sheet(groups: list[dict], folder: Path, path: Path, side: int = 150) -> None:
    """Each near-duplicate group as a row of pictures, to judge by eye."""
    rows = [d["files"] for d in groups]
    width = max(len(r) for r in rows) * side
    sheet = Image.new("RGB", (width, side * len(rows)), "white")
    for y, files in enumerate(rows):
        for x, f in enumerate(files):
            picture = open_image(f)
            picture.thumbnail((side - 6, side - 6))
            sheet.paste(picture, (x * side + 3, y * side + 3))
    buffer = io.BytesIO()
    sheet.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(buffer, "PNG", optimize=True)
    path.write_bytes(buffer.getvalue())
    print(f"\nWrote {path} ({len(rows)} groups, one per row)")


def default_brain() -> str:
    """``../shared/data/brain-mri-600`` beside the repository (or beside the worktrees' folder)."""
    repo = Path(__file__).resolve().parents[1]
    for base in (repo.parent, repo.parent.parent):
        if (base / "shared/data/brain-mri-600").is_dir():
            return str(base / "shared/data/brain-mri-600")
    return str(repo.parent / "shared/data/brain-mri-600")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--brain", default=default_brain(), help="the brain MRI folder (default: ../shared/data/...)")
    parser.add_argument("--originals", type=int, default=25, help="images copied per set (x 8 edits)")
    parser.add_argument("--moved", type=int, default=10, help="images moved to a wrong label per set")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--sheet", help="write the brain set's near-duplicate groups as one PNG here")
    args = parser.parse_args()
    sets = [("flowers", sample_data_dir("flowers"))]
    if Path(args.brain).is_dir():
        sets.append(("brain-mri-600", Path(args.brain)))
    else:
        print(f"(no brain MRI set at {args.brain}; flowers only)")
    with tempfile.TemporaryDirectory() as tmp:
        for name, folder in sets:
            workspace = Path(tmp) / f"ws-{name}"
            found = unmodified(name, folder, workspace)
            planted_copies(name, folder, workspace, args.originals, args.seed)
            moved_labels(name, folder, workspace, args.moved, args.seed)
            if args.sheet and name == "brain-mri-600" and found["near_groups"]:
                contact_sheet(found["near_groups"], folder, Path(args.sheet))


if __name__ == "__main__":
    main()
