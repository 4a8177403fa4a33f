"""The ``imgclf`` command: argument parsing and printing only.

Every verb calls the Python API; errors are :class:`ImgclfError` and become
one line on stderr with the error's exit code (2 for bad input).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
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
_EXTRA_FOR_MODULE.update({"imagehash": "insight", "matplotlib": "insight", "scipy": "insight"})

EPILOG = """examples:
  imgclf train                                  train on the bundled flower photos
  imgclf train photos/ --out pets.imgclf        one subfolder per label in photos/
  imgclf train photos/ --fine-tune --nproc-per-node 4   one process per GPU (torchrun; docs: Distributed training)
  imgclf evaluate pets.imgclf holdout/ --json
  imgclf predict pets.imgclf some.jpg more_images/ --top-k 3
  imgclf predict pets.onnx archive/ list.txt --out results.parquet   resumable batch scoring
  imgclf export pets.imgclf --out pets.onnx     portable model for other runtimes
  imgclf audit photos/ --out audit/             duplicates, leaks, label errors: a page to fix them from
  imgclf report pets.imgclf holdout/ --out r/   curves, confusion matrix, calibration, top losses
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


class _PrintHandler(logging.Handler):
    """Log records as indented lines on whatever ``sys.stdout`` is now."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"  {record.getMessage()}", flush=True)


def _print_log_lines(name: str) -> None:
    logger = logging.getLogger(name)
    if not any(isinstance(h, _PrintHandler) for h in logger.handlers):
        logger.addHandler(_PrintHandler())
    logger.setLevel(logging.INFO)


def _tsv(text: str) -> str:
    r"""A field for tab-separated output: backslash, tab, newline and carriage return escaped
    (``\\``, ``\t``, ``\n``, ``\r``), so a file name can never break a line or a column;
    bytes of a name that are not UTF-8 are written ``\xNN`` instead of stopping the output."""
    text = text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


#: Options that only mean something with a switch: (option dest, its flag, the switch's dest, its flag).
_NEEDS_SWITCH = [
    ("unfreeze", "--unfreeze", "fine_tune", "--fine-tune"),
    ("fine_tune_epochs", "--fine-tune-epochs", "fine_tune", "--fine-tune"),
    ("keep_orientation", "--keep-orientation", "fine_tune", "--fine-tune"),
    ("max_memory_gb", "--max-memory-gb", "fine_tune", "--fine-tune"),
    ("early_stopping_metric", "--early-stopping-metric", "early_stopping", "--early-stopping"),
    ("patience", "--patience", "early_stopping", "--early-stopping"),
    ("min_delta", "--min-delta", "early_stopping", "--early-stopping"),
]


def _check_switches(args: argparse.Namespace) -> None:
    """An option given without its switch would be silently ignored: say so instead."""
    from imgclf.errors import OptionError

    for dest, flag, switch, switch_flag in _NEEDS_SWITCH:
        if getattr(args, dest) is not None and not getattr(args, switch):
            raise OptionError(f"{flag} only applies with {switch_flag}; add {switch_flag} or drop {flag}")
    if args.validation_folder and args.validation_fraction is not None:
        raise OptionError("give --validation-folder or --validation-fraction, not both")


def _check_train_outputs(args: argparse.Namespace) -> None:
    """Every file train will write can be written, checked before any work starts."""
    from imgclf.atomic import check_output_folder, check_output_path
    from imgclf.errors import OptionError

    check_output_path(args.out, "model", option="--out")
    if args.report:
        check_output_folder(args.report, "report", option="--report")
    if args.metrics_json:
        check_output_path(args.metrics_json, "metrics", option="--metrics-json", stream_ok=True)
        if Path(args.metrics_json).resolve() == Path(args.out).resolve():
            raise OptionError(f"--metrics-json {args.metrics_json}: is also --out; give the metrics another file name")


def cmd_train(args: argparse.Namespace) -> int:
    from imgclf.training import distributed

    if distributed.is_main_process():
        return _train(args, distributed)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):  # rank 0 alone reports
        return _train(args, distributed)


def _train(args: argparse.Namespace, distributed) -> int:
    from imgclf.atomic import atomic_write_text, check_not_an_input
    from imgclf.data.images import load_images_from_directory
    from imgclf.errors import OptionError
    from imgclf.sample_data import sample_data_dir
    from imgclf.training.history import EarlyStopping
    from imgclf.training.trainer import ImageClassificationTrainer

    # Every option and output first: a mistake must cost a second, not a training run.
    _check_switches(args)
    _check_train_outputs(args)
    if not 0 < args.test_fraction < 1:
        raise ImgclfError(f"--test-fraction must be between 0 and 1 (exclusive), got {args.test_fraction}")
    fine_tune_options = None
    if args.fine_tune:
        from imgclf.training.finetune import FineTuneOptions

        fine_tune_options = FineTuneOptions(unfreeze=args.unfreeze, keep_orientation=bool(args.keep_orientation), **(
            {"epochs": args.fine_tune_epochs} if args.fine_tune_epochs is not None else {}))  # fmt: skip
        _print_log_lines("imgclf")  # the fine-tune's decisions, one line each
    early = None
    if args.early_stopping:
        early = EarlyStopping(metric=args.early_stopping_metric or "accuracy",
                              min_delta=0.0 if args.min_delta is None else args.min_delta,
                              patience=10 if args.patience is None else args.patience)  # fmt: skip

    def report(m) -> None:
        if args.verbose or m.phase == "fine-tune" or m.epoch == 1 or m.epoch % 10 == 0 or m.epoch == args.epochs:
            print(f"  {m}", flush=True)

    trainer = ImageClassificationTrainer(
        args.arch, epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
        lr_schedule=args.lr_schedule, early_stopping=early, metrics_callback=report, seed=args.seed,
        weights=args.weights, device=args.device, workspace=args.workspace, use_cache=not args.no_cache,
        validation_fraction=args.validation_fraction, progress=not args.quiet, class_weight=args.class_weight,
        fine_tune=args.fine_tune, fine_tune_options=fine_tune_options, tta=args.tta, resume=args.resume,
        engine=args.engine, precision=args.precision, max_memory_gb=args.max_memory_gb,
    )  # fmt: skip
    trainer.validate()
    if args.weights and not Path(args.weights).is_file():
        raise ImgclfError(f"--weights {args.weights}: weights file not found")
    if args.nproc_per_node is not None:
        distributed.check_process_count(args.nproc_per_node, args.device)
        if args.nproc_per_node != int(os.environ.get("LOCAL_WORLD_SIZE", args.nproc_per_node)):
            raise OptionError(f"--nproc-per-node {args.nproc_per_node}: already running under torchrun with "
                              f"{os.environ['LOCAL_WORLD_SIZE']} processes per node; give one or the other")  # fmt: skip
    trainer.progress = trainer.progress and distributed.is_main_process()

    folder = Path(args.folder) if args.folder else sample_data_dir("flowers")
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            images = load_images_from_directory(folder)
            validation = load_images_from_directory(args.validation_folder) if args.validation_folder else None
            inputs = [im.source for im in images + (validation or [])] + ([args.weights] if args.weights else [])
            check_not_an_input(args.out, inputs, "model", option="--out")
            if args.metrics_json:
                check_not_an_input(args.metrics_json, inputs, "metrics", option="--metrics-json")
            if args.report:
                from imgclf.insight.report import check_outside_inputs

                check_outside_inputs(Path(args.report), images + (validation or []), option="--report")
            if (args.nproc_per_node or 1) > 1 and not distributed.under_torchrun():
                return distributed.launch(args.argv, args.nproc_per_node)  # N ranks of this command, torchrun
            labels = sorted({im.label for im in images})
            print(f"Found {len(images)} images of {len(labels)} labels in {folder}: {', '.join(labels)}")
            print(f"Training {args.arch}, holding out {args.test_fraction:.0%} of the readable images for evaluation",
                  flush=True)  # fmt: skip
            model, test = trainer.fit_and_hold_out(images, args.test_fraction, validation_set=validation)
            if not distributed.is_main_process():
                caught.clear()  # rank 0 reports the warnings, evaluates, saves
                return 0
            held_out = {id(im) for im in test}
            _warn_about_duplicates([im for im in images if id(im) not in held_out], test, validation)
            metrics, out = _evaluate_and_save(model, test, args, [im for im in images if id(im) not in held_out])
        finally:
            _print_skipped(caught)
    # The model is safe on disk; only now the extras that could still fail.
    if args.metrics_json:
        atomic_write_text(args.metrics_json, json.dumps(metrics.to_dict(), indent=2) + "\n", "metrics")
    print(f"\nSaved model to {out} ({time.perf_counter() - started:.1f} s in all)")
    if args.report:
        from imgclf.insight.report import write_report

        print(f"Report: {write_report(model, test or None, args.report, name=str(out))}")
    return 0


def _evaluate_and_save(model, test, args: argparse.Namespace, train_images=()):
    """Report, evaluate on the held-out images, save. The run's checkpoint stays until the
    save succeeds, so if anything here fails (or is interrupted) --resume finishes in seconds."""
    from imgclf.errors import ModelFileError, TrainingInterrupted

    kept = model.checkpoint_path_
    hint = f"; the trained run is kept in {kept}: run the same command with --resume to save it in seconds"
    try:
        training = model.info["training"]
        if training["resumed_from"]:
            print(f"Resumed from the checkpoint after {training['resumed_from']}")
        elif args.resume:
            print("No checkpoint of this run to resume from; trained from the start")
        ext = model.info["extraction"]
        print(f"Features: {ext['extracted']} images through the network, {ext['cached']} from the workspace cache")
        print(f"Trained on {training['train_images']} images; evaluating on the {training['held_out_images']} held out")
        from_features = model.held_out_features_ is not None and not model.tta
        ran = model.engine_choice(len(test))
        metrics = model.evaluate_held_out(test)
        model.info["metrics"] = {**metrics.to_dict(), "precision": "fp32" if from_features else ran.precision}
        print(metrics)
        decision = model.info.get("precision_decision") or {}
        if decision.get("line"):
            print(f"Precision: {decision['line']}")
        return metrics, model.save(args.out)
    except KeyboardInterrupt:
        raise TrainingInterrupted("interrupted" + (hint if kept else "")) from None
    except ModelFileError as e:
        raise ModelFileError(f"{e}{hint if kept else ''}") from None


def _engine_line(model) -> None:
    """The one start-up line saying which engine and precision run the network, and why."""
    print(f"imgclf: {model.engine_choice().describe()}", file=sys.stderr, flush=True)


def _warn_about_duplicates(train, test, validation) -> None:
    """One line when the folder has copies under two labels or copies across the held-out images."""
    try:
        from imgclf.insight.audit import training_warning

        line = training_warning(train, test, validation or [])
    except ModuleNotFoundError:  # the insight extra (imagehash) is not installed: the check is optional
        return
    if line:
        print(f"warning: {line}", file=sys.stderr)


def cmd_audit(args: argparse.Namespace) -> int:
    from imgclf.insight.audit import audit

    result = audit(args.folder, args.against, arch=args.arch, weights=args.weights, workspace=args.workspace,
                   use_cache=not args.no_cache, device=args.device, test_fraction=args.test_fraction,
                   seed=args.seed, progress=not (args.quiet or args.json))  # fmt: skip
    page = result.write_html(args.out) if args.out else None
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print(result.summary())
    if page:
        print(f"Gallery: {page}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from imgclf.data.images import load_images_from_directory
    from imgclf.insight.report import write_report

    model = load_predictor(args.model, args.device)
    images = load_images_from_directory(args.folder) if args.folder else None
    page = write_report(model, images, args.out, name=str(args.model))
    print(f"Report: {page}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from imgclf.data.images import load_images_from_directory

    model = load_predictor(args.model, args.device, args.engine, precision=args.precision)
    images = load_images_from_directory(args.folder)
    model.job_size = len(images)  # a few images on a torch model run eagerly, at the same precision
    _engine_line(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = model.evaluate(images)
    print(json.dumps({**metrics.to_dict(), "ran": model.engine_choice().to_dict()}, indent=2) if args.json else metrics)
    _print_skipped(caught)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from imgclf.data.images import find_image_files

    if args.out or args.engine == "ray":
        return cmd_predict_to_file(args)
    _refuse_options_of(args, ("batch_size", "commit_every", "quiet"), "--out")
    if args.top_k < 1:
        raise ImgclfError(f"--top-k must be at least 1, got {args.top_k}")
    model = load_predictor(args.model, args.device, args.engine, precision=args.precision)
    files = find_image_files(args.images)
    if not files:
        raise ImgclfError(f"no images found in {', '.join(args.images)}")
    model.job_size = len(files)  # a few images on a torch model run eagerly, at the same precision
    _engine_line(model)
    ran = model.engine_choice().to_dict()
    results, failed = [], 0
    for name, outcome in model.iter_predictions((f, str(f)) for f in files):
        if isinstance(outcome, ImgclfError):
            failed += 1
            results.append({"file": name, "error": str(outcome)})
            if not args.json:
                print(f"error: {_tsv(str(outcome))}", file=sys.stderr)
            continue
        results.append({"file": name, **outcome.to_dict(top_k=args.top_k if args.top_k > 1 else None), **ran})
        if not args.json:
            line = f"{_tsv(name)}\t{_tsv(outcome.label)}\t{outcome.probability:.4f}"
            if args.top_k > 1:
                line += "\t" + ", ".join(f"{_tsv(lbl)} {p:.4f}" for lbl, p in outcome.top(args.top_k))
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
                                     cpus_per_worker=args.cpus_per_worker or 1, precision=args.precision,
                                     gpus_per_worker=args.gpus_per_worker or 0, **options)  # fmt: skip
        else:
            from imgclf.batch.local import score_to_folder

            commit_every = 30.0 if args.commit_every is None else args.commit_every
            summary = score_to_folder(args.model, args.images, args.out, device=args.device, engine=args.engine,
                                      precision=args.precision, commit_every=commit_every, **options)  # fmt: skip
    except KeyboardInterrupt as e:
        print(f"imgclf: {e or 'interrupted'}", file=sys.stderr)
        return 130
    print(summary)
    return 0


def cmd_certify(args: argparse.Namespace) -> int:
    from imgclf.atomic import check_output_path
    from imgclf.data.images import ImageData, find_image_files, load_images_from_directory
    from imgclf.errors import DataError, OptionError
    from imgclf.inference.model import load_model, read_model_config
    from imgclf.inference.precision import measure_precisions, record_certificate
    from imgclf.nets.cpu import cpu_capabilities
    from imgclf.nets.engines import certificate_verdict

    read_model_config(args.model)  # an .onnx or a corrupt file is refused before any image
    out = Path(args.out) if args.out else Path(args.model)
    check_output_path(out, "model", option="--out" if args.out else None)
    caps = cpu_capabilities()
    precision = args.precision if args.precision != "auto" else ("bf16" if caps.bf16 else "int8")
    if precision == "bf16" and not caps.bf16:
        raise OptionError(f"--precision bf16: this CPU has no native bf16 ({caps.source}); certify on a CPU that has it")
    model = load_model(args.model)
    if precision == "int8" and model.int8_graph_ is None:
        raise OptionError(f"{args.model}: has no calibrated int8 graph; train it with --precision int8 first")
    images: list[ImageData] = []
    for given in args.images:
        folder = Path(given)
        labelled = folder.is_dir() and any(p.is_dir() and p.name in model.labels for p in folder.iterdir())
        if labelled:
            images += load_images_from_directory(folder)
        else:
            images += [ImageData(f) for f in find_image_files([given])]
    if not images:
        raise DataError(f"no images found in {', '.join(args.images)}")
    if len({im.label is None for im in images}) > 1:
        images = [ImageData(im.source, None, im.name) for im in images]  # mixed: agreement only
    entry = measure_precisions(model, images, ["fp32", precision])[precision]
    record_certificate(model, precision, entry)
    model.save(out)
    ok, said = certificate_verdict(model.info["precision_metrics"], precision, caps)
    print(f"{precision} on {entry['images']} images: top labels {100 * entry['top_label_agreement']:.1f}% equal to "
          f"fp32, largest probability change {entry['largest_probability_change']:.4f}; "
          f"{'auto now takes it' if ok else 'auto stays on fp32'} ({said}). Saved {out}")  # fmt: skip
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from imgclf.atomic import check_not_an_input, check_output_path
    from imgclf.inference.model import load_model, read_model_config

    if args.format != "onnx":
        raise ImgclfError(f"unknown export format '{args.format}'; use onnx")
    from imgclf.data.uris import is_remote
    from imgclf.inference.export import default_export_path

    read_model_config(args.model)  # a missing, corrupt or already-ONNX model is refused first
    out = args.out or default_export_path(args.model)
    if not is_remote(out):
        out = Path(out)
        check_not_an_input(out, [args.model], "ONNX file", option="--out" if args.out else None)
        check_output_path(out, "ONNX file", option="--out" if args.out else None)
    model = load_model(args.model)
    started = time.perf_counter()
    written = model.export_onnx(out, quantize=args.quantize, precision=args.precision)
    if is_remote(written):
        from imgclf.data.uris import filesystem

        fs, bare = filesystem(str(written))
        size = fs.size(bare)
    else:
        size = Path(written).stat().st_size
    print(f"Exported {args.model} to {out} ({size / 1e6:.1f} MB, {time.perf_counter() - started:.1f} s)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from imgclf.errors import OptionError
    from imgclf.serve import create_app
    from imgclf.serve.server import LOOPBACK_HOSTS, bind_socket, is_loopback, run_server

    if not 0 < args.port < 65536:
        raise ImgclfError(f"--port must be between 1 and 65535, got {args.port}")
    api_key = args.api_key or os.environ.get("IMGCLF_API_KEY") or None
    if api_key and args.no_api_key:
        raise OptionError("--no-api-key contradicts the API key given (--api-key or IMGCLF_API_KEY); drop one")
    loopback = is_loopback(args.host)
    if not loopback and not api_key and not args.no_api_key:
        raise OptionError(f"--host {args.host} serves beyond this machine, so an API key is required: "
                          "--api-key KEY or IMGCLF_API_KEY=KEY, or --no-api-key to serve without one")  # fmt: skip
    allowed_hosts = args.allowed_host or (LOOPBACK_HOSTS if loopback else None)
    app = create_app(args.model, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                     max_request_bytes=int(args.max_request_mb * 1024 * 1024), max_pixels=args.max_pixels,
                     decode_memory_bytes=int(args.decode_memory_mb * 1024 * 1024), read_timeout=args.read_timeout,
                     api_key=api_key, cors_origins=args.cors_origin or (), allowed_hosts=allowed_hosts,
                     engine=args.engine, precision=args.precision)  # fmt: skip
    sock = bind_socket(args.host, args.port)  # before "Serving on": a port in use is one line, exit 2
    url_host = f"[{args.host}]" if ":" in args.host else args.host
    access = "API key required" if api_key else "no API key"
    print(f"Serving {args.model} on http://{url_host}:{args.port}/ (API docs at /docs; {access}); "
          f"{app.state.predictor.engine_choice().describe()}", flush=True)  # fmt: skip
    run_server(app, sock)
    return 0


#: The inference engines and precisions (imgclf.nets.engines; spelled out so --help imports nothing).
ENGINE_CHOICES = ("auto", "onnxruntime", "openvino", "torch")
PRECISION_CHOICES = ("auto", "fp32", "bf16", "int8")


def _add_engine_options(p: argparse.ArgumentParser, *, ray: bool = False, training: bool = False) -> None:
    """--engine and --precision, the same on every command that runs the network."""
    engines = (*ENGINE_CHOICES, "ray") if ray else ENGINE_CHOICES
    what = "the engine extracting features" if training else "the inference engine"
    extra = "; ray: score on a Ray cluster (needs --out and pip install 'imgclf[ray]'), each worker " \
            "picking its inference engine as auto does" if ray else ""  # fmt: skip
    p.add_argument("--engine", default="auto", choices=engines,
                   help=f"{what}: auto picks the fastest here for the precision (docs: Engines and "
                        f"precision){extra} (default: %(default)s)")  # fmt: skip
    if training:
        p.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                       help="auto: certify bf16 where the CPU has it natively and there are at least 300 "
                            "images; bf16: certify it whatever the count; int8: calibrate the int8 graph on the "
                            "training images and measure it; fp32: neither (default: %(default)s)")  # fmt: skip
    else:
        p.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                       help="auto: bf16 (native only), then int8, where the model carries a certificate for it "
                            "measured on a CPU like this one (300 unseen images, top labels 99%% equal to fp32), "
                            "else fp32; never depends on the job's size (default: %(default)s)")  # fmt: skip


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
    print(f"  checkpoints      {usage.checkpoints} unfinished or unsaved run(s), {usage.checkpoint_bytes / mb:.1f} MB")
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
    p.add_argument("--early-stopping-metric", choices=["accuracy", "loss"],
                   help="with --early-stopping: the metric watched (default: accuracy)")  # fmt: skip
    p.add_argument("--patience", type=int,
                   help="with --early-stopping: epochs without improvement before stopping (default: 10)")  # fmt: skip
    p.add_argument("--min-delta", type=float,
                   help="with --early-stopping: smallest change that counts as improvement (default: 0)")  # fmt: skip
    p.add_argument(
        "--fine-tune",
        action="store_true",
        help="after the head, train the backbone too, with augmentation (slower, usually more accurate)",
    )
    p.add_argument("--unfreeze", type=int, help="with --fine-tune: train only the last N blocks (default: all)")
    p.add_argument(
        "--fine-tune-epochs",
        type=int,
        help="with --fine-tune: most epochs of fine-tuning; it stops sooner when they stop paying (default: 10)",
    )
    p.add_argument(
        "--keep-orientation",
        action="store_true",
        default=None,  # None: not given (so giving it without --fine-tune can be refused)
        help="with --fine-tune: no flips, rotations or shears (for images whose orientation carries meaning)",
    )
    p.add_argument("--tta", action="store_true", help="average each prediction with its mirror image")
    p.add_argument("--class-weight", choices=["balanced"], help="weigh rare labels up (for skewed folders)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.add_argument(
        "--seed", type=int, default=1, help="seed for shuffling, splitting and training (default: %(default)s)"
    )
    p.add_argument("--workspace", help="folder for cached features (default: ~/.cache/imgclf)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write cached features")
    p.add_argument("--metrics-json", help="also write the held-out metrics as JSON to this file (or /dev/stdout)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true", help="print metrics after every epoch")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--report", metavar="DIR", help="also write the training report (see 'imgclf report') to DIR")
    _add_engine_options(p, training=True)
    p.add_argument(
        "--nproc-per-node",
        type=int,
        metavar="N",
        help="train in N processes on this machine (one per GPU; on the CPU, cores are shared) under "
        "torchrun, PyTorch's launcher; for several machines run torchrun yourself (docs: Distributed training)",
    )
    p.add_argument(
        "--max-memory-gb",
        type=float,
        metavar="GB",
        help="with --fine-tune: hold decoded photos in memory only up to this much for the machine, "
        "else stream them from disk each epoch (default: a quarter of its memory)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="metrics of a model on a labelled folder")
    p.add_argument("model", help="model file (.imgclf or exported .onnx)")
    p.add_argument("folder", help="folder with one subfolder of images per label")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto (default: %(default)s)")
    _add_engine_options(p)
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
    _add_engine_options(p, ray=True)
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

    p = sub.add_parser("certify", help="measure bf16 or int8 against fp32 on images the model never saw",
                       description="Run MODEL at fp32 and at a lossy precision on IMAGES the model never saw "
                                   "(files or folders; a folder of label subfolders adds the accuracy check) "
                                   "and record the agreement in the model file, for auto to read. auto takes "
                                   "the precision where top labels are equal to fp32 on at least 99%% of at "
                                   "least 300 such images, on a CPU like this one.")  # fmt: skip
    p.add_argument("model", help="model file (.imgclf)")
    p.add_argument("images", nargs="+", help="image files or folders the model was not trained on")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "int8"),
                   help="auto: bf16 where the CPU has it natively, else int8 (default: %(default)s)")  # fmt: skip
    p.add_argument("--out", help="write the certified model here (default: rewrite MODEL in place, atomically)")
    p.set_defaults(func=cmd_certify)

    p = sub.add_parser("export", help="export a model to ONNX for other languages and runtimes")
    p.add_argument("model", help="model file (.imgclf)")
    p.add_argument("--format", default="onnx", help="export format (default: %(default)s)")
    p.add_argument("--out", help="output file (default: MODEL with .onnx suffix)")
    p.add_argument("--quantize", choices=["int8"], help="write int8 weights (smaller; check accuracy first)")
    p.add_argument("--precision", choices=["fp32", "int8"], default="fp32",
                   help="int8: write the model's calibrated static int8 graph (faster; trained with --precision "
                        "int8) (default: %(default)s)")  # fmt: skip
    p.set_defaults(func=cmd_export)

    from imgclf.serve.limits import DECODE_MEMORY_BYTES, MB, READ_TIMEOUT, SERVE_MAX_PIXELS

    p = sub.add_parser("serve", help="web page and HTTP API that score uploaded images",
                       description="Serve MODEL: a page at / and a JSON API under /v1 (documented at /docs). "
                                   "Binding beyond this machine needs an API key (or --no-api-key).")  # fmt: skip
    p.add_argument("model", help="model file (.imgclf or exported .onnx)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=16, help="most images per network call; 1 turns batching off")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="longest wait to fill a batch (default: %(default)s)")
    p.add_argument("--max-request-mb", type=float, default=10.0, help="largest request body (default: %(default)s)")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=SERVE_MAX_PIXELS,
        help="refuse larger images from their header, with 413 (default: %(default)s, a 48 MP photo fits)",
    )
    p.add_argument(
        "--decode-memory-mb",
        type=float,
        default=DECODE_MEMORY_BYTES // MB,
        help="memory that concurrent image decodes may use together (default: %(default)s)",
    )
    p.add_argument(
        "--read-timeout",
        type=float,
        default=READ_TIMEOUT,
        help="seconds to wait for more of a request body before answering 408 (default: %(default)s)",
    )
    p.add_argument(
        "--api-key",
        help="require this key in the X-API-Key header (or as a bearer token) for /v1; "
        "default: $IMGCLF_API_KEY, which keeps it out of the process list",
    )
    p.add_argument("--no-api-key", action="store_true", help="serve beyond this machine without an API key")
    p.add_argument(
        "--cors-origin",
        action="append",
        metavar="ORIGIN",
        help="let pages from ORIGIN (e.g. https://example.com, or *) call the API; repeatable",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        metavar="NAME",
        help="answer requests for this Host name (repeatable; * for any). Default: localhost, "
        "127.0.0.1 and ::1 when bound to loopback, any host otherwise",
    )
    _add_engine_options(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("audit", help="find duplicates, leaks, label errors and odd images in a labelled folder",
                       description="Audit FOLDER (one subfolder per label) before training on it: unreadable, "
                                   "tiny or blank images, exact and near-duplicates (loudly when they span labels), "
                                   "copies leaking into --against (or across the split 'train' makes), suspected "
                                   "label errors and outliers. Exit code 0 whatever it finds.")  # fmt: skip
    p.add_argument("folder", help="folder with one subfolder of images per label")
    p.add_argument("--against", metavar="TEST_FOLDER", help="test folder to check for copies of FOLDER's images")
    p.add_argument("--out", metavar="DIR", help="write an HTML gallery of the findings to DIR/index.html")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    p.add_argument("--arch", default="efficientnet_lite0", help="backbone for the features (default: %(default)s)")
    p.add_argument("--weights", help="pretrained weights file for --arch")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out share of 'train' (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1, help="seed of that split and of the folds (default: %(default)s)")
    p.add_argument("--workspace", help="folder for cached features (default: ~/.cache/imgclf)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write cached features")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: %(default)s)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("report", help="training report: curves, confusion matrix, calibration, top losses",
                       description="Write DIR/index.html (an offline page), each chart as PNG and the numbers as "
                                   "JSON. From MODEL alone: its training curves and held-out confusion matrix; with "
                                   "a labelled FOLDER it is evaluated there too, adding calibration and top losses.")  # fmt: skip
    p.add_argument("model", help="model file (.imgclf or exported .onnx)")
    p.add_argument("folder", nargs="?", help="labelled folder to evaluate on (one subfolder per label)")
    p.add_argument("--out", default="report", metavar="DIR", help="folder to write to (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto (default: %(default)s)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("cache", help="size of the workspace's cached features and checkpoints; --clear empties it")
    p.add_argument("--workspace", help="the workspace (default: $IMGCLF_WORKSPACE or ~/.cache/imgclf)")
    p.add_argument("--clear", action="store_true", help="delete the cached features and unfinished-run checkpoints")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("archs", help="list architectures and whether their weights are here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_archs)
    return parser


_stopping = False  # a stop signal arrived: under torchrun, what fails after it is part of stopping


def _stop(*_) -> None:
    """The first stop signal interrupts; later ones (torchrun stopping a rank that is already
    stopping or exiting) change nothing."""
    global _stopping
    if not _stopping:
        _stopping = True
        raise KeyboardInterrupt


def _sigterm_as_interrupt() -> None:
    """SIGTERM stops training the way Ctrl-C does: checkpoint, message, exit 130."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)
        if "WORLD_SIZE" in os.environ:  # a rank of a torchrun job: torchrun stops ranks with SIGINT or SIGTERM
            signal.signal(signal.SIGINT, _stop)


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse like ``parse_args``, but an unknown option is reported with the usage of the
    subcommand it was given to, not the top-level one."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        subparsers.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def _should_print_failure(message: str, interrupted: bool) -> bool:
    """Under torchrun one rank prints (see imgclf.training.distributed.report_failure)."""
    if "WORLD_SIZE" not in os.environ:
        return True
    from imgclf.training.distributed import report_failure

    return report_failure(message, interrupted)


def main(argv: Sequence[str] | None = None) -> int:
    global _stopping
    if "WORLD_SIZE" not in os.environ:
        return _main(argv)
    try:  # a rank of a torchrun job: a stop signal that lands while it reports a failure ends it quietly
        return _main(argv)
    except KeyboardInterrupt:
        return 130
    finally:
        _stopping = True  # exiting now: a stop signal from here on is ignored


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --nproc-per-node starts again on each rank
    if args.command == "train" or (args.command == "predict" and args.out):
        _sigterm_as_interrupt()
    try:
        return args.func(args)
    except ImgclfError as e:
        if _should_print_failure(str(e), e.exit_code == 130):
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
        if _should_print_failure("interrupted", True):
            print("imgclf: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        if "WORLD_SIZE" not in os.environ:
            raise
        from imgclf.training.distributed import peer_stopped

        if _stopping:  # a collective broken by the stop: part of it
            if _should_print_failure("interrupted", True):
                print("imgclf: interrupted", file=sys.stderr)
            return 130
        if peer_stopped(e):  # another rank failed first: its message is the one to read
            if _should_print_failure("another rank stopped", True):
                print("imgclf: error: another rank stopped; torchrun's failure summary names it", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
