"""Batch-prediction throughput: imgclf's path against the tutorial way, side by side.

Workloads: (a) the bundled 200 flower photos as they are (about 320x240);
(b) the same 200 re-encoded as 4032x3024 JPEGs (quality 90), like phone photos.
Paths, each run in its own process so peak RSS is its own:
  naive   per image: PIL open + convert("RGB") -> timm eval transform -> model at batch 1 (eager torch)
  imgclf  ImageClassifier.iter_predictions: decode+resize in threads, JPEG draft decode, batches of 32,
          ONNX Runtime engine
  ceiling the engine alone on pre-decoded tensors (batch 32): the most any path could reach

    python benchmarks/throughput.py [--limit 200]

Engines x precisions (``--engines [FOLDER ...]``, default: the bundled flowers and
../shared/data/brain-mri-600 when it is there): for each set, trains a model as
``imgclf train`` does (80/20 held-out split, int8 calibrated on the training
images, held-out metrics per precision), then scores every image of the set with
each engine and precision, side by side in one process:
  batch img/s    ``predict_batch``-style streaming over the files (decode + network), as
                 ``imgclf predict --out`` scores them
  network img/s  the engine alone on pre-decoded batches of 32 (8 batches)
  held-out acc   accuracy on the 20% held out at training (fp32 on ONNX Runtime is today's)
  agreement      share of ALL the set's images whose top label equals ONNX Runtime fp32's
The row ``auto`` is what ``precision="auto"`` picks for this model on this machine (when it
is the same as another row, the two show the run's noise). Files are read once before the
first row, so every row finds them in the page cache.

    python benchmarks/throughput.py --engines [FOLDER ...]
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


def engine_table(folders: list[Path], workspace: str) -> None:
    """Engines x precisions for a model trained on each folder (see the module docstring)."""
    import numpy as np

    from imgclf import ImageClassificationTrainer, load_images_from_directory
    from imgclf.data.imaging import load_array
    from imgclf.inference.precision import available_precisions, calibrate_int8
    from imgclf.nets.cpu import cpu_capabilities, cpu_name

    print(f"CPU: {cpu_name()}, {__import__('os').cpu_count()} cores; {cpu_capabilities().describe()}")
    for folder in folders:
        images = load_images_from_directory(folder)
        t = time.perf_counter()
        model, held_out = ImageClassificationTrainer(workspace=workspace, progress=False).fit_and_hold_out(images)
        model.info["metrics"] = model.evaluate(held_out).to_dict()
        held = {id(im) for im in held_out}
        calibrate_int8(model, [im for im in images if id(im) not in held])  # to time it; auto needs a certificate
        print(f"\n{folder.name}: {len(images)} images, {len(held_out)} held out; trained, calibrated and measured "
              f"in {time.perf_counter() - t:.0f} s")  # fmt: skip
        auto = model.engine_choice()
        print(f"  auto picks: {auto.describe()}")
        files = [im.source for im in images]
        for f in files:  # in the page cache for every row alike (the first row would pay the disk)
            Path(f).read_bytes()
        arrays = np.stack([load_array(f, model.preprocessing) for f in files[:32]])
        rows = [("onnxruntime", "fp32"), ("openvino", "fp32")]
        rows += [("openvino", "bf16")] if "bf16" in available_precisions(model) else []
        rows += [("onnxruntime", "int8"), ("openvino", "int8")] if model.int8_graph_ is not None else []
        rows += [("auto", "auto")]
        print(f"  {'engine':<12} {'precision':<9} {'batch img/s':>11} {'x ORT fp32':>10} {'network img/s':>13} "
              f"{'held-out acc':>12} {'agreement':>9}")  # fmt: skip
        base = reference = None
        for engine, precision in rows:
            model.use_engine(engine, precision)
            model._probabilities(arrays)  # compiled and warm before the clock starts
            started = time.perf_counter()
            for _ in range(8):
                model._probabilities(arrays)
            network = 8 * len(arrays) / (time.perf_counter() - started)
            started = time.perf_counter()
            labels = [p.label for p in model.predict_batch(files)]
            batch = len(files) / (time.perf_counter() - started)
            accuracy = model.evaluate(held_out).micro_accuracy
            base = base or batch
            reference = reference or labels
            agreement = np.mean([a == b for a, b in zip(labels, reference)])
            name = f"auto ({model.engine_choice().engine})" if engine == "auto" else engine
            print(f"  {name:<12} {model.engine_choice().precision:<9} {batch:>11.1f} {batch / base:>9.2f}x "
                  f"{network:>13.1f} {accuracy:>12.4f} {100 * agreement:>8.1f}%", flush=True)  # fmt: skip
            model.features_engine = None


def measure(path: str, folder: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", path, str(folder)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=200, help="images per workload")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument(
        "--engines",
        nargs="*",
        metavar="FOLDER",
        help="engines x precisions on these labelled folders instead (default: flowers, brain MRI)",
    )
    args = parser.parse_args()
    if args.engines is not None:
        from imgclf import sample_data_dir

        brain = [b / "shared/data/brain-mri-600" for b in Path(__file__).resolve().parents]
        default = [sample_data_dir("flowers"), *[b for b in brain if b.is_dir()][:1]]
        with tempfile.TemporaryDirectory() as tmp:
            engine_table([Path(f) for f in args.engines] or default, f"{tmp}/ws")
        return
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
