"""Batch-prediction throughput: imgclf's path against the tutorial way, side by side.

Workloads: (a) the bundled 200 flower photos as they are (about 320x240);
(b) the same 200 re-encoded as 4032x3024 JPEGs (quality 90), like phone photos.
Paths, each run in its own process so peak RSS is its own:
  naive   per image: PIL open + convert("RGB") -> timm eval transform -> model at batch 1 (eager torch)
  imgclf  ImageClassifier.iter_predictions: decode+resize in threads, JPEG draft decode, batches of 32,
          ONNX Runtime engine
  ceiling the engine alone on pre-decoded tensors (batch 32): the most any path could reach

    python benchmarks/throughput.py [--limit 200]
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def build_model():
    """EfficientNet-Lite0 backbone with a 5-label head (speed does not depend on its weights)."""
    import torch

    from imgclf.inference.model import ImageClassifier
    from imgclf.nets.archs import create_backbone, get_architecture

    arch = get_architecture("efficientnet_lite0")
    backbone, _ = create_backbone(arch)
    head = torch.nn.Linear(backbone.num_features, 5)
    torch.manual_seed(0)
    return ImageClassifier(backbone, head, ["a", "b", "c", "d", "e"], arch=arch.name, timm_name=arch.timm_name,
                           preprocessing=arch.preprocessing)  # fmt: skip


def run_path(path: str, files: list[Path]) -> dict:
    import numpy as np
    import torch

    model = build_model()
    if path == "naive":
        from PIL import Image
        from timm.data import create_transform

        p = model.preprocessing
        transform = create_transform(input_size=(3, p.input_size, p.input_size), crop_pct=p.crop_pct,
                                     interpolation=p.interpolation, mean=p.mean, std=p.std)  # fmt: skip
        net = model.network().eval()
        started = time.perf_counter()
        with torch.no_grad():
            for f in files:
                net(transform(Image.open(f).convert("RGB")).unsqueeze(0))
    elif path == "imgclf":
        model._engine_for(model.batch_size)  # build the engine before the clock starts, as training does
        started = time.perf_counter()
        for _ in model.iter_predictions((f, str(f)) for f in files):
            pass
    else:  # ceiling
        engine = model._engine_for(model.batch_size)
        x = np.random.default_rng(0).standard_normal((32, 3, 224, 224)).astype(np.float32)
        engine(x)
        started = time.perf_counter()
        for _ in range(max(1, len(files) // 32)):
            engine(x)
        files = files[: 32 * max(1, len(files) // 32)]
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"path": path, "images": len(files), "seconds": seconds, "images_per_s": len(files) / seconds,
            "peak_rss_mb": peak_mb}  # fmt: skip


def make_phone_photos(files: list[Path], dest: Path) -> list[Path]:
    from PIL import Image

    def convert(f: Path) -> Path:
        out = dest / f"{f.parent.name}_{f.stem}.jpg"
        buf = io.BytesIO()
        Image.open(f).convert("RGB").resize((4032, 3024), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
        out.write_bytes(buf.getvalue())
        return out

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(convert, files))


def decode_change(folders: dict[str, Path], workspace: str) -> None:
    """Largest probability change that reduced-size (draft) JPEG decoding causes,
    with a model trained on the flowers, full decode vs imgclf's decode."""
    import numpy as np

    from imgclf import ImageClassificationTrainer, load_images_from_directory, sample_data_dir
    from imgclf.data.imaging import load_array

    model = ImageClassificationTrainer(workspace=workspace, progress=False).fit(
        load_images_from_directory(sample_data_dir("flowers")))  # fmt: skip
    print("\nreduced-size decode vs full decode (trained head-only model):")
    for name, folder in folders.items():
        files = sorted(folder.glob("**/*.jpg"))
        fast = model.predict_proba_arrays(np.stack([load_array(f, model.preprocessing) for f in files]))
        full = model.predict_proba_arrays(
            np.stack([load_array(f, model.preprocessing, fast_decode=False) for f in files])
        )
        changed = int((fast.argmax(1) != full.argmax(1)).sum())
        print(f"  {name:<28} largest probability change {np.abs(fast - full).max():.4f}, "
              f"labels changed {changed} of {len(files)}")  # fmt: skip


def measure(path: str, folder: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", path, str(folder)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=200, help="images per workload")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, folder = args.child
        print(json.dumps(run_path(path, sorted(Path(folder).glob("**/*.jpg")))))
        return

    from imgclf import sample_data_dir

    flowers = sorted(sample_data_dir("flowers").glob("*/*.jpg"))[: args.limit]
    with tempfile.TemporaryDirectory() as tmp:
        small, big = Path(tmp) / "a", Path(tmp) / "b"
        small.mkdir()
        big.mkdir()
        for f in flowers:
            (small / f"{f.parent.name}_{f.name}").write_bytes(f.read_bytes())
        t = time.perf_counter()
        make_phone_photos(flowers, big)
        print(f"(re-encoded {len(flowers)} photos at 4032x3024 in {time.perf_counter() - t:.0f} s)")
        ceiling = measure("ceiling", small)
        print(f"\nceiling: engine alone, pre-decoded batches of 32: {ceiling['images_per_s']:.1f} images/s\n")
        print(f"{'workload':<28} {'naive img/s':>11} {'imgclf img/s':>12} {'ratio':>6} {'% ceiling':>9} "
              f"{'naive RSS':>9} {'imgclf RSS':>10}")  # fmt: skip
        for name, folder in (("(a) flowers ~320x240", small), ("(b) same, 4032x3024 JPEG", big)):
            naive, ours = measure("naive", folder), measure("imgclf", folder)
            print(f"{name:<28} {naive['images_per_s']:>11.1f} {ours['images_per_s']:>12.1f} "
                  f"{ours['images_per_s'] / naive['images_per_s']:>5.1f}x "
                  f"{100 * ours['images_per_s'] / ceiling['images_per_s']:>8.0f}% "
                  f"{naive['peak_rss_mb']:>7.0f}MB {ours['peak_rss_mb']:>8.0f}MB")  # fmt: skip
        decode_change({"(a) flowers ~320x240": small, "(b) same, 4032x3024 JPEG": big}, f"{tmp}/ws")


if __name__ == "__main__":
    main()
