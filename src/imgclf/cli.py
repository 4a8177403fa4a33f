"""The ``imgclf`` command: argument parsing and printing only.

Every verb calls the Python API; errors are :class:`ImgclfError` and become
one line on stderr with the error's exit code (2 for bad input).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from imgclf import options, rows
from imgclf.errors import ImgclfError, MissingDependencyError, OptionError
from imgclf.inference.loading import load_predictor

EPILOG = """examples:
  imgclf train                                  train on the bundled flower photos
  imgclf train photos/ --out pets.imgclf        one subfolder per label in photos/
  imgclf train photos/ --fine-tune --nproc-per-node 4   one process per GPU (torchrun; docs: Distributed training)
  imgclf train more/ --from pets.imgclf --out pets2.imgclf   add photos and labels without the old photos
  imgclf evaluate pets.imgclf holdout/ --json
  imgclf predict pets.imgclf some.jpg more_images/ --top-k 3
  imgclf predict pets.onnx archive/ list.txt --out results.parquet   resumable batch scoring
  imgclf export pets.imgclf --out pets.onnx     portable model for other runtimes
  imgclf audit photos/ --out audit/             duplicates, leaks, label errors: a page to fix them from
  imgclf report pets.imgclf holdout/ --out r/   curves, confusion matrix, calibration, top losses
  imgclf cache --clear                          free the cached features
"""


def _for_the_user(caught: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    """The caught warnings a user of the command acts on: not deprecations, which are for the
    developers of the code that raised them (SQLAlchemy under MLflow's default store turns its
    own on, and it was a ``warning:`` line of every ``train --mlflow``)."""
    return [w for w in caught if not issubclass(w.category, DeprecationWarning)]


def _print_skipped(caught: list[warnings.WarningMessage]) -> None:
    caught = _for_the_user(caught)
    skipped = [str(w.message) for w in caught if str(w.message).startswith("skipped ")]
    for w in caught:
        if not str(w.message).startswith("skipped "):
            print(f"warning: {w.message}", file=sys.stderr)
    if skipped:
        print(f"\nSkipped {len(skipped)} unreadable image(s):", file=sys.stderr)
        for line in skipped:
            print(f"  {line[len('skipped ') :]}", file=sys.stderr)


def _print_warnings_now(caught: list[warnings.WarningMessage]) -> None:
    """Print the warnings caught so far but the unreadable images (listed together at the end),
    and forget them: what is wrong with a folder is said before the work on it starts."""
    now = [w for w in _for_the_user(caught) if not str(w.message).startswith("skipped ")]
    for w in now:
        print(f"warning: {w.message}", file=sys.stderr, flush=True)
        caught.remove(w)


@contextlib.contextmanager
def _warnings_as_lines():
    """Warnings raised inside the block, each printed after it as one ``warning:`` line on stderr
    (unreadable images listed together), never as Python's two-line file-and-line form."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default", UserWarning)  # ours; others keep their filters (deprecations stay quiet)
        try:
            yield caught
        finally:
            _print_skipped(caught)


class _PrintHandler(logging.Handler):
    """Log records as indented lines on whatever ``sys.stdout`` is now."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"  {record.getMessage()}", flush=True)


@contextlib.contextmanager
def _log_lines_printed(name: str):
    """Logger ``name``'s INFO records printed as lines while the command runs, and not after it
    (a Python caller of ``main`` keeps a quiet library)."""
    logger = logging.getLogger(name)
    handler, level = _PrintHandler(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _check_train_outputs(args: argparse.Namespace) -> None:
    """Every file train will write can be written, checked before any work starts."""
    from imgclf.atomic import check_output_path
    from imgclf.insight.pages import check_page_folder

    check_output_path(args.out, "model", option="--out", model="safetensors")
    if args.report:
        check_page_folder(Path(args.report), "report", option="--report")
    if args.metrics_json:
        check_output_path(args.metrics_json, "metrics", option="--metrics-json", stream_ok=True)
        if Path(args.metrics_json).resolve() == Path(args.out).resolve():
            raise OptionError(f"--metrics-json {args.metrics_json}: is also --out; give the metrics another file name")


def cmd_train(args: argparse.Namespace) -> int:
    from imgclf.training import distributed

    with _log_lines_printed("imgclf"):  # the quality's and the fine-tune's decisions, one line each
        if distributed.is_main_process():
            return _train(args, distributed)
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):  # rank 0 alone reports
            return _train(args, distributed)


def _train(args: argparse.Namespace, distributed) -> int:
    from imgclf.atomic import atomic_write_text, check_not_an_input
    from imgclf.data.images import is_multilabel, label_names
    from imgclf.data.layouts import load_dataset
    from imgclf.sample_data import sample_data_dir
    from imgclf.training.history import EarlyStopping
    from imgclf.training.trainer import ImageClassificationTrainer

    # Every option and output first (the values were checked on parsing): a mistake must
    # cost a second, not a training run.
    _check_train_outputs(args)
    fine_tune_options = None
    if args.fine_tune:
        from imgclf.training.finetune import FineTuneOptions

        fine_tune_options = FineTuneOptions(unfreeze=args.unfreeze, keep_orientation=args.keep_orientation,
                                            epochs=args.fine_tune_epochs)  # fmt: skip
    early = None
    if args.early_stopping:
        early = EarlyStopping(metric=args.early_stopping_metric, min_delta=args.min_delta, patience=args.patience)

    def report(m) -> None:
        if args.verbose or m.phase == "fine-tune" or m.epoch == 1 or m.epoch % 10 == 0 or m.epoch == args.epochs:
            print(f"  {m}", flush=True)

    if args.no_keep_features and _given(args, "--keep-features-mb"):
        raise OptionError("give --keep-features-mb or --no-keep-features, not both")
    if args.from_model and not _given(args, "--arch"):
        _arch_from_old_model(args)
    trainer = ImageClassificationTrainer(
        args.arch, epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
        lr_schedule=args.lr_schedule, early_stopping=early, metrics_callback=report, seed=args.seed,
        weights=args.weights, device=args.device, workspace=args.workspace, use_cache=not args.no_cache,
        validation_fraction=args.validation_fraction, progress=not args.quiet, class_weight=args.class_weight,
        quality=args.quality, time_limit=args.time_limit, fine_tune=args.fine_tune,
        fine_tune_options=fine_tune_options, tta=args.tta, resume=args.resume,
        engine=args.engine, precision=args.precision, max_memory_gb=args.max_memory_gb, tracking=_trackers(args),
        from_model=args.from_model, keep_features_mb=0.0 if args.no_keep_features else args.keep_features_mb,
        frame=args.frame, unknown_rate=args.unknown_rate,
    )  # fmt: skip
    trainer.validate()
    if args.weights and not Path(args.weights).is_file():
        raise ImgclfError(f"--weights {args.weights}: weights file not found")
    ranks_here = os.environ.get("LOCAL_WORLD_SIZE")  # set when already running under torchrun
    if args.nproc_per_node is not None:
        distributed.check_process_count(args.nproc_per_node, args.device)
        if ranks_here is not None and args.nproc_per_node != int(ranks_here):
            raise OptionError(f"--nproc-per-node {args.nproc_per_node}: already running under torchrun with "
                              f"{ranks_here} processes per node; give one or the other")  # fmt: skip
    trainer.progress = trainer.progress and distributed.is_main_process()

    folder = args.folder or sample_data_dir("flowers")
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            dataset = load_dataset(folder, **_manifest_columns(args))
            images, validation, test = dataset.train, dataset.validation, dataset.test
            if test is not None and _given(args, "--test-fraction"):
                raise OptionError(f"--test-fraction: {folder} has its own test images ({len(test)}); "
                                  "drop --test-fraction")  # fmt: skip
            if validation is not None and (args.validation_folder or args.validation_fraction):
                flag = "--validation-folder" if args.validation_folder else "--validation-fraction"
                raise OptionError(f"{flag}: {folder} has its own validation images ({len(validation)}); drop {flag}")
            if args.validation_folder:  # a folder of label subfolders, or a manifest
                validation = load_dataset(args.validation_folder).images
            _print_warnings_now(caught)  # an empty label folder: said before the training, not after
            given = images + (validation or []) + (test or [])
            inputs = [im.source for im in given if isinstance(im.source, Path)] + dataset.manifests
            inputs += [p for p in (args.weights, args.from_model, args.label_map) if p]
            check_not_an_input(args.out, inputs, "model", option="--out")
            if args.metrics_json:
                check_not_an_input(args.metrics_json, inputs, "metrics", option="--metrics-json")
            if args.report:
                from imgclf.insight.report import check_outside_inputs

                check_outside_inputs(Path(args.report), given, option="--report")
            if (args.nproc_per_node or 1) > 1 and not distributed.under_torchrun():
                return distributed.launch(args.argv, args.nproc_per_node)  # N ranks of this command, torchrun
            labels = label_names(images)
            counts = "" if len(dataset.parts) < 2 else f" ({', '.join(f'{len(v)} {k}' for k, v in dataset.parts)})"
            kind = " (multi-label: sets of labels)" if is_multilabel(images) else ""
            print(f"Found {len(dataset.images)} images{counts} of {len(labels)} labels{kind} in {folder}: "
                  f"{', '.join(labels)}")  # fmt: skip
            print(f"Layout: {dataset.layout}")
            on = f" on from {args.from_model}" if args.from_model else ""
            theirs = " (and the held-out features it keeps)" if args.from_model else ""
            if test is not None:
                print(f"Training {args.arch}{on}; its {len(test)} test images{theirs} are held out for evaluation",
                      flush=True)  # fmt: skip
            else:
                print(f"Training {args.arch}{on}, holding out {args.test_fraction:.0%} of the readable "
                      f"{'new ' if on else ''}images{theirs} for evaluation", flush=True)  # fmt: skip
            model, test = trainer.fit_and_hold_out(images, args.test_fraction, validation_set=validation,
                                                   test_set=test)  # fmt: skip
            if not distributed.is_main_process():
                caught.clear()  # rank 0 reports the warnings, evaluates, saves
                return 0
            if args.from_model:
                _trained_on_line(model)
            held_out = {id(im) for im in test}
            _warn_about_duplicates([im for im in images if id(im) not in held_out], test, validation)
            part = "test" if dataset.test is not None else "held-out"
            metrics, out = _evaluate_and_save(model, test, args, [im for im in images if id(im) not in held_out],
                                              part)  # fmt: skip
        finally:
            _print_skipped(caught)
    # The model is safe on disk; only now the extras that could still fail.
    if args.metrics_json:
        said = {**metrics.to_dict(), "measured_on": model.info["metrics"]["measured_on"]}
        atomic_write_text(args.metrics_json, json.dumps(said, indent=2) + "\n", "metrics")
    print(f"\nSaved model to {out} ({time.perf_counter() - started:.1f} s in all)")
    if args.report:
        from imgclf.insight.report import write_report

        with _warnings_as_lines():
            page = write_report(model, test or None, args.report, name=str(out))
        print(f"Report: {page}")
    if trainer.tracker_:
        _finish_tracking(trainer.tracker_, model, out, metrics, args, test)
    return 0


def _trained_on_line(model) -> None:
    """What a model trained on from another learned from, in one line."""
    was = model.info["trained_on_from"]
    old_train = was["stored_images"] - was["stored_held_out"]
    new = [label for label in model.labels if label not in was["labels"]]
    capped = (f" (it kept {was['stored_images']} of its {was['stored_of_images']} images' features)"
              if was["stored_of_images"] > was["stored_images"] else "")  # fmt: skip
    print(f"Trained on from {was['file']} (sha256 {was['sha256'][:12]}): its {old_train} stored training features"
          f"{capped} and {model.info['training']['train_images'] - old_train} new images; "
          f"{len(was['labels'])} labels{' + new: ' + ', '.join(new) if new else ', none new'}; its "
          f"{was['stored_held_out']} held-out features are "
          f"{'not measured (--tta scores photos)' if model.tta else 'measured with the new held-out images'}")  # fmt: skip


def _manifest_columns(args: argparse.Namespace) -> dict:
    """--path-column, --label-column and --label-map as :func:`imgclf.data.layouts.load_dataset` takes them."""
    return {"path_column": args.path_column, "label_column": args.label_column, "label_map": args.label_map}


def _trackers(args: argparse.Namespace) -> list:
    """--mlflow and --tensorboard as the trainer's ``tracking``."""
    from imgclf.training.tracking import MlflowTracker, TensorBoardTracker

    trackers = []
    if args.mlflow:
        trackers.append(MlflowTracker(args.mlflow_experiment, args.mlflow_run_name, args.mlflow_register))
    if args.tensorboard:
        trackers.append(TensorBoardTracker(args.tensorboard))
    return trackers or None


def _finish_tracking(tracker, model, out: Path, metrics, args: argparse.Namespace, test) -> None:
    """Log the saved model, its metrics and report; a failure here is one warning (the model is saved)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker.finish(model, model_file=out, metrics=metrics.to_dict(), report=args.report and Path(args.report),
                       held_out=test)  # fmt: skip
    _print_skipped(caught)
    for each in tracker.trackers:
        if getattr(each, "run_id_", None):
            version = f"; registered as models:/{each.register}/{each.registered_version_}" if each.register else ""
            print(f"MLflow run {each.run_id_}: model at {each.model_uri_}{version}")
        elif getattr(each, "log_dir", None):
            print(f"TensorBoard: tensorboard --logdir {each.log_dir}")


def _given(args: argparse.Namespace, flag: str) -> bool:
    """Whether ``flag`` was typed (not just left at its default)."""
    return any(a == flag or a.startswith(flag + "=") for a in args.argv)


def _arch_from_old_model(args: argparse.Namespace) -> None:
    """``train --from`` without ``--arch``: the old model's architecture, said in one line. An
    unreadable old model is left to the checks of training on, which say why in one line."""
    from imgclf.data.uris import local_model_file
    from imgclf.inference.model import read_model_config

    try:
        arch = read_model_config(local_model_file(args.from_model))["arch"]
    except (ImgclfError, OSError, KeyError):
        return
    if arch != args.arch:
        print(f"Architecture: {arch}, as {args.from_model} (training on keeps it)")
        args.arch = arch


def _evaluate_and_save(model, test, args: argparse.Namespace, train_images=(), part: str = "held-out"):
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
        ran = f" (engine {ext['engine']}, fp32)" if ext["extracted"] and ext.get("engine") else ""  # training's features are fp32
        print(f"Features: {ext['extracted']} images through the network{ran}, {ext['cached']} from the workspace cache")
        where = "test images" if part == "test" else "held out"
        print(f"Trained on {training['train_images']} images; evaluating on the {training['held_out_images']} {where}")
        from_features = model.held_out_features_ is not None and not model.tta
        ran = model.engine_choice(len(test))
        metrics = model.evaluate_held_out(test)
        measured_on = {"part": part, "images": metrics.count, "train_images": training["train_images"],
                       "validation_images": training["validation_images"]}  # fmt: skip
        model.info["metrics"] = {**metrics.to_dict(), "precision": "fp32" if from_features else ran.precision,
                                 "measured_on": measured_on}  # fmt: skip
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
    from imgclf.insight.pages import check_page_folder

    if args.out:  # before the features are computed
        check_page_folder(Path(args.out), "gallery", option="--out",
                          inside=tuple(f for f in (args.folder, args.against) if f and os.path.isdir(f)))  # fmt: skip

    with _warnings_as_lines():  # an empty label folder, a workspace that cannot be written: one line each
        result = audit(args.folder, args.against, arch=args.arch, weights=args.weights, workspace=args.workspace,
                       use_cache=not args.no_cache, device=args.device, test_fraction=args.test_fraction,
                       seed=args.seed, progress=not (args.quiet or args.json), **_manifest_columns(args))  # fmt: skip
    page = result.write_html(args.out) if args.out else None
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print(result.summary())
    if page:
        print(f"Gallery: {page}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from imgclf.insight.pages import check_page_folder
    from imgclf.insight.report import write_report

    check_page_folder(Path(args.out), "report", option="--out",  # before the model is loaded
                      inside=(args.folder,) if args.folder and os.path.isdir(args.folder) else ())  # fmt: skip

    with _warnings_as_lines():  # an old model file without an unknown-input detector says so, once
        model = load_predictor(args.model, args.device)
    with _warnings_as_lines():  # an empty label folder; how many images could not be read (listed on the page)
        images = _evaluation_images(args) if args.folder else None
        if images:  # the network runs: which engine and precision, as evaluate says them
            model.job_size = len(images)
            _engine_line(model)
        page = write_report(model, images, args.out, name=str(args.model))
    print(f"Report: {page}")
    return 0


def _evaluation_images(args: argparse.Namespace) -> list:
    """The images ``evaluate`` and ``report`` measure on: a labelled input's test part when it has
    one, else all of it; one line on stderr says which when the input is more than a folder."""
    from imgclf.data.layouts import evaluation_images, load_dataset

    dataset = load_dataset(args.folder, **_manifest_columns(args), for_training=False)
    images, which = evaluation_images(dataset)
    if len(dataset.parts) > 1 or dataset.manifests:
        print(f"imgclf: {dataset.layout}; measuring on {which}", file=sys.stderr, flush=True)
    return images


def cmd_evaluate(args: argparse.Namespace) -> int:
    with _warnings_as_lines():  # an old model file without an unknown-input detector says so, once
        model = load_predictor(args.model, args.device, args.engine, precision=args.precision)
    with _warnings_as_lines():
        images = _evaluation_images(args)
    model.job_size = len(images)  # a few images on a torch model run eagerly, at the same precision
    _engine_line(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = model.evaluate(images, reject_unknown=args.reject_unknown)
    said = {**metrics.to_dict(), "measured_on": {"images": metrics.count, "listed": len(images)},
            "ran": model.engine_choice().to_dict()}  # fmt: skip
    print(json.dumps(said, indent=2) if args.json else metrics)
    _print_skipped(caught)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from imgclf.data.images import find_image_files

    if args.out or args.engine == "ray":
        return cmd_predict_to_file(args)
    from imgclf.data.manifests import is_manifest

    listed = next((i for i in args.images if is_manifest(i) and Path(i).is_file()), None)
    if listed is not None:  # it would be read as an image and fail as one
        raise OptionError(f"{listed}: a manifest; predict reads manifests into a results file: add --out "
                          "results.parquet (or .csv, .jsonl), or give the images themselves")  # fmt: skip
    with _warnings_as_lines():  # an old model file without an unknown-input detector says so, once
        model = load_predictor(args.model, args.device, args.engine, precision=args.precision)
    files = find_image_files(args.images)
    if not files:
        raise ImgclfError(f"no images found in {', '.join(args.images)}")
    model.job_size = len(files)  # a few images on a torch model run eagerly, at the same precision
    if args.reject_unknown and model.multilabel:
        raise OptionError(f"--reject-unknown: {args.model} is a multi-label model: its rows carry known, but it "
                          "does not answer 'unknown' in place of a set yet; drop --reject-unknown")  # fmt: skip
    if args.reject_unknown and model.unknown_threshold is None:
        raise OptionError(f"--reject-unknown: {args.model} has no unknown-input detector (it was trained before "
                          "imgclf had one); train it again to get one")  # fmt: skip
    _engine_line(model)
    ran = model.engine_choice().to_dict()
    results, failed = [], 0
    explained = None
    if args.explain:
        from imgclf.inference.explain import ExplanationFolder

        explained = ExplanationFolder(args.explain, model, args.images)
    outcomes = model.iter_predictions((f, str(f)) for f in files) if explained is None else explained.run(files)
    for name, outcome in outcomes:
        extra = {}
        if explained is not None and not isinstance(outcome, ImgclfError):
            outcome, extra = outcome
        if isinstance(outcome, ImgclfError):
            failed += 1
            row = rows.failed(name, str(outcome))
            if not args.json:
                print(f"error: {rows.tsv_cell(str(outcome))}", file=sys.stderr)
        else:
            row = outcome.row(name, args.top_k)
            if args.reject_unknown:
                row = rows.rejected(row)
            if not args.json:
                print(rows.line(row, args.top_k))
        results.append({**rows.document(row), **ran, **extra})
    if explained is not None:
        explained.close()
        if not args.json:
            print(f"explained {explained.count} image(s) in {args.explain} (index.jsonl lists them)", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
    return 1 if failed else 0


def cmd_predict_to_file(args: argparse.Namespace) -> int:
    """``predict --out``: batch scoring into a results folder (imgclf.batch), here or on Ray."""
    if args.engine == "ray" and not args.out:
        raise OptionError("--engine ray writes its results to files: add --out results.parquet (or .csv, .jsonl)")
    if args.json:
        raise OptionError("--json prints results; with --out they go to the file, so leave one of them out")
    common = {"top_k": args.top_k, "batch_size": args.batch_size, "progress": not args.quiet}
    try:
        if args.engine == "ray":
            from imgclf.batch.ray import filtered_stderr, score_with_ray

            with filtered_stderr():  # a line per actor from Ray's core that is not an error (see RAY_CORE_NOISE)
                summary = score_with_ray(args.model, args.images, args.out, address=args.address,
                                         workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                                         precision=args.precision, gpus_per_worker=args.gpus_per_worker,
                                         **common)  # fmt: skip
        else:
            from imgclf.batch.local import score_to_folder

            summary = score_to_folder(args.model, args.images, args.out, device=args.device, engine=args.engine,
                                      precision=args.precision, commit_every=args.commit_every, **common)  # fmt: skip
    except KeyboardInterrupt as e:
        print(f"imgclf: {e or 'interrupted'}", file=sys.stderr)
        return 130
    print(summary)
    return 0


def cmd_certify(args: argparse.Namespace) -> int:
    from imgclf.atomic import check_output_path
    from imgclf.data.images import ImageData, find_image_files, load_images_from_directory
    from imgclf.data.uris import is_remote
    from imgclf.errors import DataError
    from imgclf.inference.model import load_model, read_model_config
    from imgclf.inference.precision import measure_precisions, record_certificate, unseen_images
    from imgclf.nets.cpu import cpu_capabilities
    from imgclf.nets.engines import certificate_verdict

    read_model_config(args.model)  # an .onnx or a corrupt file is refused before any image
    if is_remote(args.model) and not args.out:
        raise OptionError(f"{args.model}: a model in an object store is not rewritten in place; give --out FILE")
    out = Path(args.out) if args.out else Path(args.model)
    check_output_path(out, "model", option="--out" if args.out else None, model="safetensors")
    caps = cpu_capabilities()
    precision = args.precision if args.precision != "auto" else ("bf16" if caps.bf16 else "int8")
    if precision == "bf16" and not caps.bf16:
        raise OptionError(
            f"--precision bf16: this CPU has no native bf16 ({caps.source}); certify on a CPU that has it"
        )
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
            if folder.is_dir() and any(p.is_dir() for p in folder.iterdir()):
                print(f"certify: {given}: its subfolders are not this model's labels; its images count for "
                      "top-label agreement only (no accuracy)", file=sys.stderr)  # fmt: skip
            images += [ImageData(f) for f in find_image_files([given])]
    if not images:
        raise DataError(f"no images found in {', '.join(args.images)}")
    if len({im.label is None for im in images}) > 1:
        images = [ImageData(im.source, None, im.name) for im in images]  # mixed: agreement only
    images, said = unseen_images(model, images)
    if said:
        print(f"certify: {said}", file=sys.stderr)
    if not images:
        raise DataError(f"none of the images in {', '.join(args.images)} is one the model never saw: certify "
                        "measures on new images")  # fmt: skip
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
    from imgclf.data.uris import is_remote
    from imgclf.inference.export import default_export_path
    from imgclf.inference.model import load_model, read_model_config

    read_model_config(args.model)  # a missing, corrupt or already-ONNX model is refused first
    out = args.out or default_export_path(args.model)
    if not is_remote(out):
        out = Path(out)
        check_not_an_input(out, [args.model], "ONNX file", option="--out" if args.out else None)
        check_output_path(out, "ONNX file", option="--out" if args.out else None, model="onnx")
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

    from imgclf.serve import create_app
    from imgclf.serve.server import LOOPBACK_HOSTS, bind_socket, is_loopback, resolve_host, run_server

    resolve_host(args.host, args.port)
    api_key = args.api_key  # checked on parsing (imgclf.options.API_KEY)
    if api_key is None and "IMGCLF_API_KEY" in os.environ:
        api_key = os.environ["IMGCLF_API_KEY"]
        if api_key not in options.API_KEY:  # set but empty would serve with no key at all
            raise OptionError(f"IMGCLF_API_KEY must be {options.API_KEY.describe()}; unset it to serve without one")
    if api_key and args.no_api_key:
        raise OptionError("--no-api-key contradicts the API key given (--api-key or IMGCLF_API_KEY); drop one")
    loopback = is_loopback(args.host)
    if not loopback and not api_key and not args.no_api_key:
        raise OptionError(f"--host {args.host} serves beyond this machine, so an API key is required: "
                          "--api-key KEY or IMGCLF_API_KEY=KEY, or --no-api-key to serve without one")  # fmt: skip
    allowed_hosts = args.allowed_host or (LOOPBACK_HOSTS if loopback else None)
    app = create_app(args.model, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                     max_request_bytes=math.ceil(args.max_request_mb * options.MB), max_pixels=args.max_pixels,
                     decode_memory_bytes=math.ceil(args.decode_memory_mb * options.MB), read_timeout=args.read_timeout,
                     api_key=api_key, cors_origins=args.cors_origin or (), allowed_hosts=allowed_hosts,
                     engine=args.engine, precision=args.precision,
                     access_log=None if args.quiet else sys.stderr)  # fmt: skip
    sock = bind_socket(args.host, args.port)  # before "Serving on": a port in use is one line, exit 2
    url_host = f"[{args.host}]" if ":" in args.host else args.host
    access = "API key required" if api_key else "no API key"
    print(f"Serving {args.model} on http://{url_host}:{args.port}/ (API docs at /docs; {access}); "
          f"{app.state.predictor.engine_choice().describe()}", flush=True)  # fmt: skip
    run_server(app, sock)
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


#: What each command runs; its options are ``imgclf.options.COMMANDS[name]``.
COMMAND_FUNCTIONS = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "certify": cmd_certify,
                     "export": cmd_export, "serve": cmd_serve, "audit": cmd_audit, "report": cmd_report,
                     "cache": cmd_cache, "archs": cmd_archs}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser, built from the option schema (imgclf.options): a flag, its type,
    default, choices and help are declared there once."""
    from imgclf.version import __version__

    parser = argparse.ArgumentParser(
        prog="imgclf", description="Train, evaluate and use image classifiers by transfer learning.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"imgclf {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for schema in options.COMMANDS.values():
        p = sub.add_parser(schema.name, help=schema.help, description=schema.description)
        for option in schema.cli_options:
            _add_argument(p, schema, option)
        p.set_defaults(func=COMMAND_FUNCTIONS[schema.name])
    return parser


def _add_argument(p: argparse.ArgumentParser, schema: options.Schema, option: options.Option) -> None:
    """One option as argparse takes it. An option that needs a switch defaults to None here,
    so that giving it without the switch can be refused; :func:`_check_options` fills it in."""
    kwargs: dict = {"help": options.help_text(schema, option).replace("%", "%%")}
    if option.positional:
        p.add_argument(option.name, nargs=option.nargs, **kwargs)
        return
    flags = [f for f in (option.short, option.flag) if f]
    default = None if option.needs else option.default
    if option.type is bool:
        p.add_argument(*flags, dest=option.name, action="store_true", default=default, **kwargs)
        return
    if option.type in (int, float):
        kwargs["type"] = option.type
    if isinstance(option.constraint, options.Choices):
        kwargs["choices"] = option.constraint.values
    if option.repeat:
        kwargs["action"] = "append"
    p.add_argument(*flags, dest=option.name, default=default, metavar=option.metavar, **kwargs)


def _check_options(args: argparse.Namespace) -> None:
    """Validate the command's options against the schema, before any work; then fill in
    the defaults of those left out (options that need a switch were parsed as None)."""
    from imgclf.data.uris import as_local

    schema = options.COMMANDS[args.command]
    options.validate(schema, {o.name: getattr(args, o.name) for o in schema.cli_options})
    for option in schema.cli_options:
        if getattr(args, option.name) is None:
            setattr(args, option.name, option.default)
    for name in ("out", "metrics_json", "report", "explain"):  # what is written: file:///x is /x
        if isinstance(getattr(args, name, None), str):
            setattr(args, name, as_local(getattr(args, name)))


def _error_line(error: ImgclfError, command: str | None) -> str:
    """An error as the command line says it. The one place a parameter becomes its flag:
    library errors name ``test_fraction``, the command line says ``--test-fraction``."""
    if isinstance(error, OptionError) and command in options.COMMANDS:
        return error.spelled(options.COMMANDS[command].flags)
    return str(error)


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
        _check_options(args)
        return args.func(args)
    except ImgclfError as e:
        line = _error_line(e, args.command)
        if _should_print_failure(line, e.exit_code == 130):
            print(f"imgclf: error: {line}", file=sys.stderr)
        return e.exit_code
    except ModuleNotFoundError as e:
        root = (e.name or "").split(".")[0]
        if root not in options.EXTRA_FOR_MODULE:
            raise
        err = MissingDependencyError(
            f"'{root}' is not installed: {options.install_hint(options.EXTRA_FOR_MODULE[root])}"
        )
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
