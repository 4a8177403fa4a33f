"""The ``imgclf`` command: argument parsing and printing only.

Every verb calls the Python API; errors are :class:`ImgclfError` and become
one line on stderr with the error's exit code (2 for bad input).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from imgclf.errors import ImgclfError, MissingDependencyError
from imgclf.inference.loading import load_predictor

_EXTRA_FOR_MODULE = {"torch": "train", "timm": "train", "torchvision": "train", "safetensors": "train",
                     "onnx": "export", "onnxscript": "export", "onnxruntime": "runtime",
                     "fastapi": "serve", "uvicorn": "serve", "multipart": "serve", "tqdm": "train",
                     "pyarrow": "batch", "fsspec": "batch", "ray": "ray", "pyspark": "spark"}  # fmt: skip

EPILOG = """examples:
  imgclf train                                  train on the bundled flower photos
  imgclf train photos/ --out pets.imgclf        one subfolder per label in photos/
  imgclf evaluate pets.imgclf holdout/ --json
  imgclf predict pets.imgclf some.jpg more_images/ --top-k 3
  imgclf predict pets.onnx archive/ list.txt --out results.parquet   resumable batch scoring
  imgclf export pets.imgclf --out pets.onnx     portable model for other runtimes
  imgclf cache --clear                          free the cached features
"""


def _print_skipped(caught: list[warnings.WarningMessage]) -> None:
    skipped = [str(w.message) for w in caught if str(w.message).startswith("skipped ")]
    for w in caught:
        if not str(w.message).startswith("skipped "):
            print(f"warning: {w.message}", file=sys.stderr)
    if skipped:
        print(f"\nSkipped {len(skipped)} unreadable image(s):", file=sys.stderr)
        for line in skipped:
            print(f"  {line[len('skipped ') :]}", file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> int:
    from imgclf.data.images import load_images_from_directory
    from imgclf.data.splits import train_test_split
    from imgclf.sample_data import sample_data_dir
    from imgclf.training.history import EarlyStopping
    from imgclf.training.trainer import ImageClassificationTrainer

    folder = Path(args.folder) if args.folder else sample_data_dir("flowers")
    started = time.perf_counter()
    images = load_images_from_directory(folder)
    train, test = train_test_split(images, test_fraction=args.test_fraction, seed=args.seed)
    labels = sorted({im.label for im in images})
    print(f"Found {len(images)} images of {len(labels)} labels in {folder}: {', '.join(labels)}")
    validation = None
    if args.validation_folder:
        validation = load_images_from_directory(args.validation_folder)
    fine_tune_options = None
    if args.fine_tune:
        from imgclf.training.finetune import FineTuneOptions

        fine_tune_options = FineTuneOptions(unfreeze=args.unfreeze, **(
            {"epochs": args.fine_tune_epochs} if args.fine_tune_epochs is not None else {}))  # fmt: skip
    early = None
    if args.early_stopping:
        early = EarlyStopping(metric=args.early_stopping_metric, min_delta=args.min_delta, patience=args.patience)

    def report(m) -> None:
        if args.verbose or m.phase == "fine-tune" or m.epoch == 1 or m.epoch % 10 == 0 or m.epoch == args.epochs:
            print(f"  {m}", flush=True)

    trainer = ImageClassificationTrainer(
        args.arch, epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
        lr_schedule=args.lr_schedule, early_stopping=early, metrics_callback=report, seed=args.seed,
        weights=args.weights, device=args.device, workspace=args.workspace, use_cache=not args.no_cache,
        validation_fraction=args.validation_fraction, progress=not args.quiet, class_weight=args.class_weight,
        fine_tune=args.fine_tune, fine_tune_options=fine_tune_options, tta=args.tta, resume=args.resume,
    )  # fmt: skip
    print(f"Training on {len(train)} images, holding out {len(test)} for evaluation ({args.arch})")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = trainer.fit(train, validation_set=validation)
        if model.info["training"]["resumed_from"]:
            print(f"Resumed from the checkpoint after {model.info['training']['resumed_from']}")
        elif args.resume:
            print("No checkpoint of this run to resume from; trained from the start")
        ext = model.info["extraction"]
        print(f"Features: {ext['extracted']} images through the network, {ext['cached']} from the workspace cache")
        metrics = model.evaluate(test)
    model.info["metrics"] = metrics.to_dict()
    print(metrics)
    if args.metrics_json:
        Path(args.metrics_json).write_text(json.dumps(metrics.to_dict(), indent=2))
    out = model.save(args.out)
    print(f"\nSaved model to {out} ({time.perf_counter() - started:.1f} s in all)")
    _print_skipped(caught)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from imgclf.data.images import load_images_from_directory

    model = load_predictor(args.model, args.device)
    images = load_images_from_directory(args.folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = model.evaluate(images)
    print(json.dumps(metrics.to_dict(), indent=2) if args.json else metrics)
    _print_skipped(caught)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from imgclf.data.images import find_image_files

    if args.out or args.engine != "auto":
        return cmd_predict_to_file(args)
    _refuse_options_of(args, ("batch_size", "commit_every", "quiet"), "--out")
    if args.top_k < 1:
        raise ImgclfError(f"--top-k must be at least 1, got {args.top_k}")
    model = load_predictor(args.model, args.device)
    files = find_image_files(args.images)
    if not files:
        raise ImgclfError(f"no images found in {', '.join(args.images)}")
    results, failed = [], 0
    for name, outcome in model.iter_predictions((f, str(f)) for f in files):
        if isinstance(outcome, ImgclfError):
            failed += 1
            results.append({"file": name, "error": str(outcome)})
            if not args.json:
                print(f"error: {outcome}", file=sys.stderr)
            continue
        results.append({"file": name, **outcome.to_dict(top_k=args.top_k if args.json and args.top_k > 1 else None)})
        if not args.json:
            line = f"{name}\t{outcome.label}\t{outcome.probability:.4f}"
            if args.top_k > 1:
                line += "\t" + ", ".join(f"{lbl} {p:.4f}" for lbl, p in outcome.top(args.top_k))
            print(line)
    if args.json:
        print(json.dumps(results, indent=2))
    return 1 if failed else 0


def _refuse_options_of(args: argparse.Namespace, names: Sequence[str], switch: str) -> None:
    """Options that only mean something with ``switch`` are an error without it, not ignored."""
    from imgclf.errors import OptionError

    given = [
        f"--{n.replace('_', '-')}" if n != "quiet" else "-q" for n in names if getattr(args, n) not in (None, False)
    ]
    if given:
        raise OptionError(f"{', '.join(given)}: only with {switch}")


def cmd_predict_to_file(args: argparse.Namespace) -> int:
    """``predict --out``: batch scoring into a results folder (imgclf.batch), here or on Ray."""
    from imgclf.errors import OptionError

    if args.engine == "ray" and not args.out:
        raise OptionError("--engine ray writes its results to files: add --out results.parquet (or .csv, .jsonl)")
    if args.engine != "ray":
        _refuse_options_of(args, ("address", "workers", "cpus_per_worker", "gpus_per_worker"), "--engine ray")
    if args.json:
        raise OptionError("--json prints results; with --out they go to the file, so leave one of them out")
    options = {"top_k": args.top_k, "batch_size": args.batch_size or 32, "progress": not args.quiet}
    try:
        if args.engine == "ray":
            from imgclf.batch.ray import score_with_ray

            summary = score_with_ray(args.model, args.images, args.out, address=args.address, workers=args.workers,
                                     cpus_per_worker=args.cpus_per_worker or 1,
                                     gpus_per_worker=args.gpus_per_worker or 0, **options)  # fmt: skip
        else:
            from imgclf.batch.local import score_to_folder

            commit_every = 30.0 if args.commit_every is None else args.commit_every
            summary = score_to_folder(args.model, args.images, args.out, device=args.device,
                                      commit_every=commit_every, **options)  # fmt: skip
    except KeyboardInterrupt as e:
        print(f"imgclf: {e or 'interrupted'}", file=sys.stderr)
        return 130
    print(summary)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from imgclf.inference.model import load_model

    if args.format != "onnx":
        raise ImgclfError(f"unknown export format '{args.format}'; use onnx")
    model = load_model(args.model)
    out = Path(args.out) if args.out else Path(args.model).with_suffix(".onnx")
    started = time.perf_counter()
    model.export_onnx(out, quantize=args.quantize)
    size = out.stat().st_size / 1e6
    print(f"Exported {args.model} to {out} ({size:.1f} MB, {time.perf_counter() - started:.1f} s)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from imgclf.serve import create_app

    if not 0 < args.port < 65536:
        raise ImgclfError(f"--port must be between 1 and 65535, got {args.port}")

    app = create_app(args.model, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                     max_request_bytes=int(args.max_request_mb * 1024 * 1024))  # fmt: skip
    print(f"Serving {args.model} on http://{args.host}:{args.port}/ (API docs at /docs)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_archs(args: argparse.Namespace) -> int:
    from imgclf.nets.archs import ARCHITECTURES, preprocessing_for, weights_source

    rows = []
    for arch in ARCHITECTURES.values():
        source = weights_source(arch)
        rows.append({"name": arch.name, "timm_model": arch.timm_name, "input_size": preprocessing_for(arch).input_size,
                     "weights": source or "not available offline", "description": arch.description})  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<20} {'input':>5}  {'weights here':<42} description")
    for r in rows:
        print(f"{r['name']:<20} {r['input_size']:>5}  {r['weights']:<42} {r['description']}")
    print("\nAny timm model name also works as --arch (weights via --weights FILE or timm's download).")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from imgclf.errors import OptionError
    from imgclf.nets.workspace import clear_workspace, default_workspace, workspace_usage

    workspace = Path(args.workspace) if args.workspace else default_workspace()
    if args.workspace and not workspace.is_dir():
        raise OptionError(f"workspace folder not found: {workspace}; give the folder you trained with --workspace")
    usage = clear_workspace(workspace) if args.clear else workspace_usage(workspace)
    if args.json:
        print(json.dumps({**vars(usage), "path": str(usage.path), "cleared": args.clear}, indent=2))
        return 0
    mb = 1024 * 1024
    print(f"Removed from {workspace}:" if args.clear else f"Workspace {workspace}")
    print(f"  cached features  {usage.feature_files} images, {usage.feature_bytes / mb:.1f} MB, "
          f"{usage.feature_sets} architecture/preprocessing set(s)")  # fmt: skip
    print(f"  checkpoints      {usage.checkpoints} unfinished run(s), {usage.checkpoint_bytes / mb:.1f} MB")
    if not args.clear and usage.feature_files + usage.checkpoints:
        print(
            "Neither is needed by trained models; `imgclf cache --clear` removes both (features are re-made on demand)."
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from imgclf.version import __version__

    parser = argparse.ArgumentParser(
        prog="imgclf", description="Train, evaluate and use image classifiers by transfer learning.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"imgclf {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="train a classifier on a folder of labelled images",
                       description="Train on FOLDER (one subfolder per label), evaluate on a held-out "
                                   "split and save the model. Without FOLDER, uses the bundled flower photos.")  # fmt: skip
    p.add_argument("folder", nargs="?", help="folder with one subfolder of images per label (default: bundled flowers)")
    p.add_argument("--out", default="imageClassifier.imgclf", help="model file to write (default: %(default)s)")
    p.add_argument(
        "--arch", default="efficientnet_lite0", help="architecture (see 'imgclf archs'; default: %(default)s)"
    )
    p.add_argument("--weights", help="pretrained weights file (.safetensors or state dict) for --arch")
    p.add_argument("--epochs", type=int, default=50, help="training epochs (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=10, help="images per training step (default: %(default)s)")
    p.add_argument("--learning-rate", type=float, default=0.01, help="initial learning rate (default: %(default)s)")
    p.add_argument(
        "--lr-schedule",
        default="exponential",
        choices=["exponential", "polynomial", "constant"],
        help="learning-rate schedule; exponential decays by 0.94 every 2 epochs (default: %(default)s)",
    )
    p.add_argument(
        "--test-fraction", type=float, default=0.2, help="share held out for evaluation (default: %(default)s)"
    )
    p.add_argument("--validation-folder", help="labelled folder used for validation metrics and early stopping")
    p.add_argument("--validation-fraction", type=float, help="split this share of training images off for validation")
    p.add_argument("--early-stopping", action="store_true", help="stop when the watched metric stops improving")
    p.add_argument("--early-stopping-metric", default="accuracy", choices=["accuracy", "loss"])
    p.add_argument(
        "--patience", type=int, default=10, help="epochs without improvement before stopping (default: %(default)s)"
    )
    p.add_argument("--min-delta", type=float, default=0.0, help="smallest change that counts as improvement")
    p.add_argument(
        "--fine-tune",
        action="store_true",
        help="after the head, train the backbone too, with augmentation (slower, usually more accurate)",
    )
    p.add_argument("--unfreeze", type=int, help="with --fine-tune: train only the last N blocks (default: all)")
    p.add_argument("--fine-tune-epochs", type=int, help="with --fine-tune: epochs of fine-tuning (default: 10)")
    p.add_argument("--tta", action="store_true", help="average each prediction with its mirror image")
    p.add_argument("--class-weight", choices=["balanced"], help="weigh rare labels up (for skewed folders)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.add_argument(
        "--seed", type=int, default=1, help="seed for shuffling, splitting and training (default: %(default)s)"
    )
    p.add_argument("--workspace", help="folder for cached features (default: ~/.cache/imgclf)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write cached features")
    p.add_argument("--metrics-json", help="also write the held-out metrics as JSON to this file")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true", help="print metrics after every epoch")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="metrics of a model on a labelled folder")
    p.add_argument("model", help="model file (.imgclf or exported .onnx)")
    p.add_argument("folder", help="folder with one subfolder of images per label")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto (default: %(default)s)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="label images with a trained model")
    p.add_argument("model", help="model file (.imgclf or exported .onnx)")
    p.add_argument("images", nargs="+", help="image files or folders (walked recursively); with --out also globs, "
                                             "manifests (.txt, .csv or .parquet with a path column) and URIs")  # fmt: skip
    p.add_argument("--top-k", type=int, default=1, help="also show the k most likely labels")
    p.add_argument("--json", action="store_true", help="print one JSON array, an object per image")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto (default: %(default)s)")
    p.add_argument("--out", help="write results to this folder of parts instead: results.parquet, .csv or .jsonl; "
                                 "running the same command again continues where it stopped")  # fmt: skip
    p.add_argument("--engine", default="auto", choices=["auto", "ray"],
                   help="auto: this process, fastest inference engine here; ray: a Ray cluster "
                        "(needs --out and pip install 'imgclf[ray]') (default: %(default)s)")  # fmt: skip
    p.add_argument("--batch-size", type=int, help="with --out: images per network call (default: 32)")
    p.add_argument("--commit-every", type=float,
                   help="with --out: seconds between committed parts; a crash loses at most this much work "
                        "(default: 30)")  # fmt: skip
    p.add_argument(
        "--address", help="with --engine ray: the cluster, auto or ray://HOST:10001 (default: start Ray here)"
    )
    p.add_argument("--workers", type=int, help="with --engine ray: model replicas (default: CPUs / --cpus-per-worker)")
    p.add_argument(
        "--cpus-per-worker", type=float, help="with --engine ray: CPUs of each replica, its threads (default: 1)"
    )
    p.add_argument(
        "--gpus-per-worker", type=float, help="with --engine ray: GPUs of each replica (.imgclf models; default: 0)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="with --out: no progress bar")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="export a model to ONNX for other languages and runtimes")
    p.add_argument("model", help="model file (.imgclf)")
    p.add_argument("--format", default="onnx", help="export format (default: %(default)s)")
    p.add_argument("--out", help="output file (default: MODEL with .onnx suffix)")
    p.add_argument("--quantize", choices=["int8"], help="write int8 weights (smaller; check accuracy first)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="web page and HTTP API that score uploaded images")
    p.add_argument("model", help="model file (.imgclf or exported .onnx)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=16, help="most images per network call; 1 turns batching off")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="longest wait to fill a batch (default: %(default)s)")
    p.add_argument("--max-request-mb", type=float, default=10.0, help="largest request body (default: %(default)s)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("cache", help="size of the workspace's cached features and checkpoints; --clear empties it")
    p.add_argument("--workspace", help="the workspace (default: $IMGCLF_WORKSPACE or ~/.cache/imgclf)")
    p.add_argument("--clear", action="store_true", help="delete the cached features and unfinished-run checkpoints")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("archs", help="list architectures and whether their weights are here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_archs)
    return parser


def _sigterm_as_interrupt() -> None:
    """SIGTERM stops training the way Ctrl-C does: checkpoint, message, exit 130."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train" or (args.command == "predict" and args.out):
        _sigterm_as_interrupt()
    try:
        return args.func(args)
    except ImgclfError as e:
        print(f"imgclf: error: {e}", file=sys.stderr)
        return e.exit_code
    except ModuleNotFoundError as e:
        root = (e.name or "").split(".")[0]
        if root not in _EXTRA_FOR_MODULE:
            raise
        err = MissingDependencyError(f"'{root}' is not installed: pip install 'imgclf[{_EXTRA_FOR_MODULE[root]}]'")
        print(f"imgclf: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("imgclf: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
