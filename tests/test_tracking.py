"""Experiment tracking against the real thing: an ``mlflow server`` on loopback (SQLite
backend, a local artifact root), TensorBoard's own event reader. No mocks.

One small training run (3 labels x 6 photos, 3 epochs) logs to both; the run is read back
with ``MlflowClient``, the pyfunc model is loaded and must answer as ``imgclf predict``
does, and the registered model is predicted from as ``models:/NAME/1``.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from imgclf.training.tracking import Tracker
from tests.conftest import PREDICT, predict_json, small_flower_folder

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")

EPOCHS = 3
IMAGES = sorted(PREDICT.glob("*g"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on 127.0.0.1 with a SQLite backend and an artifact root in tmp."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(root / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no job runners: tracking needs none
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    # while the server starts: the imports training needs
    import mlflow.pyfunc  # noqa: F401

    import imgclf.cli  # noqa: F401
    import imgclf.training.trainer  # noqa: F401

    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                os.killpg(server.pid, signal.SIGKILL)
                pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
    yield uri
    os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn worker
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    log.close()


def run_cli(*argv: str) -> tuple[int, str, str]:
    from imgclf.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tracked(mlflow_server, tmp_path_factory, workspace):
    """One ``imgclf train --mlflow --tensorboard`` run: (model file, TensorBoard dir, stdout)."""
    tmp = tmp_path_factory.mktemp("tracked")
    folder = small_flower_folder(tmp / "flowers")
    model, board = tmp / "flowers.imgclf", tmp / "board"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        code, out, err = run_cli("train", folder, "--out", model, "--epochs", EPOCHS, "--workspace", workspace, "-q",
                                 "--validation-fraction", "0.25", "--report", tmp / "report",
                                 "--mlflow", "--mlflow-experiment", "flowers", "--mlflow-run-name", "small",
                                 "--mlflow-register", "flowers", "--tensorboard", board)  # fmt: skip
    assert code == 0, err
    assert "warning: mlflow" not in err and "warning: tensorboard" not in err, err
    return model, board, out


@pytest.fixture
def client(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return mlflow.MlflowClient(mlflow_server)


def the_run(client):
    experiment = client.get_experiment_by_name("flowers")
    (run,) = client.search_runs([experiment.experiment_id])
    return run


def test_the_run_holds_params_metric_history_decisions_and_artifacts(tracked, client):
    model, _, out = tracked
    run = the_run(client)
    assert run.info.run_name == "small" and run.info.status == "FINISHED"
    assert f"MLflow run {run.info.run_id}: model at runs:/{run.info.run_id}/model" in out
    params = run.data.params
    assert params["epochs"] == str(EPOCHS) and params["arch"] == "efficientnet_lite0"
    assert params["validation_fraction"] == "0.25" and params["early_stopping"] == "None"
    for name in ("head/train_loss", "head/train_accuracy", "head/validation_loss", "head/validation_accuracy",
                 "head/learning_rate"):  # fmt: skip
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, EPOCHS + 1)), name
    from imgclf.inference.model import load_model

    info = load_model(model).info
    losses = sorted(client.get_metric_history(run.info.run_id, "head/train_loss"), key=lambda m: m.step)
    assert [m.value for m in losses] == pytest.approx([h["train_loss"] for h in info["history"]])
    assert run.data.metrics["test_micro_accuracy"] == pytest.approx(info["metrics"]["micro_accuracy"])
    tags = run.data.tags
    assert tags["imgclf.precision"] == info["precision_decision"]["line"]
    assert tags["imgclf.engine"] == info["extraction"]["engine"]
    assert tags["imgclf.arch"] == "efficientnet_lite0"
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"imgclf", "report"} <= top, top
    assert "report/index.html" in {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    logged = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert [m.name for m in logged] == ["model"] and logged[0].source_run_id == run.info.run_id


def test_the_pyfunc_model_answers_as_imgclf_predict(tracked, client):
    import pandas as pd

    model, _, _ = tracked
    run = the_run(client)
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    inputs = pyfunc.metadata.get_input_schema().input_names()
    assert inputs == ["path", "image"]
    expected = predict_json(model, *IMAGES)
    by_path = pyfunc.predict(pd.DataFrame({"path": [str(p) for p in IMAGES]}))
    by_bytes = pyfunc.predict(pd.DataFrame({"image": [p.read_bytes() for p in IMAGES]}))
    for answers in (by_path, by_bytes):
        assert len(answers) == len(IMAGES)
        for path, row in zip(IMAGES, answers.itertuples()):
            want = expected[str(path)]
            assert row.label == want["label"] and row.error is None
            assert abs(row.probability - want["probability"]) < 1e-4
    broken = pyfunc.predict(pd.DataFrame({"image": [b"not a picture", IMAGES[0].read_bytes()]}))
    assert broken["error"][0] and broken["label"][1] == expected[str(IMAGES[0])]["label"]


def test_predict_from_the_registry(tracked, client):
    model, _, out = tracked
    (version,) = client.search_model_versions("name='flowers'")
    assert version.version == "1" and version.run_id == the_run(client).info.run_id
    assert "registered as models:/flowers/1" in out
    expected = predict_json(model, *IMAGES)
    from_registry = predict_json("models:/flowers/1", *IMAGES)
    assert {k: (v["label"], round(v["probability"], 4)) for k, v in from_registry.items()} == {
        k: (v["label"], round(v["probability"], 4)) for k, v in expected.items()
    }
    code, _, err = run_cli("predict", "models:/no-such-model/1", str(IMAGES[0]))
    assert code == 2 and err.count("\n") == 1 and "models:/no-such-model/1" in err, err


def test_tensorboard_files_read_back_with_tensorboards_reader(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, board, _ = tracked
    events = EventAccumulator(str(board), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    for name in ("head/train_loss", "head/train_accuracy", "head/validation_accuracy"):
        assert [e.step for e in events.Scalars(name)] == list(range(1, EPOCHS + 1)), name
    assert "test/micro_accuracy" in tags["scalars"]
    assert "test/confusion_matrix" in tags["images"]
    image = events.Images("test/confusion_matrix")[0]
    assert image.width == image.height == 3 * 24
    # the HParams plugin: the options and the metrics it compares runs by
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in content and "_hparams_/session_start_info" in content
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["epochs"].number_value == EPOCHS


def test_a_server_that_is_down_is_one_warning_and_the_model_is_saved(tmp_path, workspace, monkeypatch):
    folder = small_flower_folder(tmp_path / "flowers")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    code, out, err = run_cli("train", folder, "--out", tmp_path / "m.imgclf", "--epochs", 2, "--workspace", workspace,
                             "-q", "--mlflow")  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "m.imgclf").is_file() and "Saved model to" in out
    lines = [line for line in err.splitlines() if "mlflow" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("warning: mlflow:") and "does not answer" in lines[0], err


@pytest.mark.parametrize("flag, extra", [("--mlflow", "mlflow"), ("--tensorboard=board", "tensorboard")])
def test_without_the_package_the_flag_is_one_line_naming_the_extra(flag, extra, monkeypatch, tmp_path):
    import importlib.util

    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == extra else found(name, *a))
    code, out, err = run_cli("train", "--out", tmp_path / "m.imgclf", flag)
    assert code == 2 and out == "" and err == f"imgclf: error: {flag.split('=')[0]} needs {extra}: pip install 'imgclf[{extra}]'\n"


def test_the_mlflow_options_need_mlflow():
    code, _, err = run_cli("train", "--mlflow-register", "flowers")
    assert code == 2 and "--mlflow-register only applies with --mlflow" in err


def test_mlflow_model_uris_without_mlflow_name_the_extra(monkeypatch):
    import builtins

    from imgclf.data import uris

    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name.split(".")[0] == "mlflow":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    from imgclf.errors import MissingDependencyError

    with pytest.raises(MissingDependencyError, match=r"pip install 'imgclf\[mlflow\]'"):
        uris.local_model_file("models:/never-fetched/1")


def test_library_fit_logs_a_run_with_its_model(tmp_path, workspace, mlflow_server, client):
    from imgclf import ImageClassificationTrainer
    from imgclf.training.tracking import MlflowTracker

    folder = small_flower_folder(tmp_path / "flowers", per_class=4)
    tracker = MlflowTracker(experiment="library", run_name="fit")
    trainer = ImageClassificationTrainer(epochs=2, workspace=workspace, progress=False, tracking=tracker)
    model = trainer.fit(folder)
    run = client.get_run(tracker.run_id_)
    assert run.info.status == "FINISHED" and run.data.params["epochs"] == "2"
    assert len(client.get_metric_history(run.info.run_id, "head/train_loss")) == 2
    assert model.checkpoint_path_ is None or Path(model.checkpoint_path_).exists()  # the user's save drops it
    pyfunc = mlflow.pyfunc.load_model(tracker.model_uri_)
    import pandas as pd

    answer = pyfunc.predict(pd.DataFrame({"path": [str(IMAGES[0])]}))
    assert answer["label"][0] == model.predict(IMAGES[0]).label


def test_tensorboard_shows_misclassified_images(tracked):
    from imgclf.data.images import ImageData
    from imgclf.inference.model import load_model
    from imgclf.training.tracking import misclassified
    from tests.conftest import FLOWERS

    model = load_model(tracked[0])
    wrong = [ImageData(p, "tulips", p.name) for p in sorted((FLOWERS / "daisy").glob("*.jpg"))[10:13]]
    shown = misclassified(model, wrong, 2)
    assert len(shown) == 2
    title, picture = shown[0]
    assert title.startswith(f"{wrong[0].name}: true tulips, predicted ")
    assert picture.ndim == 3 and picture.shape[2] == 3 and max(picture.shape[:2]) <= 224


class Recorder(Tracker):
    """A tracker that writes down what it is told (a plain subclass, as users write theirs);
    ``fail_in``: the call that raises, as a server going away would."""

    name = "recorder"

    def __init__(self, fail_in: str | None = None):
        self.fail_in = fail_in
        self.calls: list[str] = []

    def _note(self, what: str) -> None:
        self.calls.append(what)
        if what == self.fail_in:
            raise ConnectionError("the server went away\nsecond line")

    def start(self, params):
        self._note("start")

    def epoch(self, m):
        self._note(f"epoch {m.phase} {m.epoch}")

    def finish(self, model, **kwargs):
        self._note("finish")

    def fail(self, status="FAILED"):
        self._note(f"fail {status}")


def test_trackers_hear_every_epoch_and_the_model_on_rank_0_alone(tmp_path, workspace, monkeypatch):
    from imgclf import ImageClassificationTrainer
    from imgclf.training import distributed

    folder = small_flower_folder(tmp_path / "flowers", per_class=4)
    heard = Recorder()
    ImageClassificationTrainer(epochs=2, workspace=workspace, progress=False, tracking=heard).fit(folder)
    assert heard.calls == ["start", "epoch head 1", "epoch head 2", "finish"]
    monkeypatch.setattr(distributed, "is_main_process", lambda: False)  # another rank of a torchrun job
    other = Recorder()
    trainer = ImageClassificationTrainer(epochs=2, workspace=workspace, progress=False, tracking=other)
    trainer.fit(folder)
    assert other.calls == [] and not trainer.tracker_


def test_a_tracker_that_fails_mid_run_is_one_warning_and_training_goes_on(tmp_path, workspace):
    from imgclf import ImageClassificationTrainer

    folder = small_flower_folder(tmp_path / "flowers", per_class=4)
    broken, fine = Recorder(fail_in="epoch head 1"), Recorder()
    with pytest.warns(UserWarning) as caught:
        model = ImageClassificationTrainer(epochs=3, workspace=workspace, progress=False,
                                           tracking=[broken, fine]).fit(folder)  # fmt: skip
    assert len(model.info["history"]) == 3
    assert broken.calls == ["start", "epoch head 1", "fail FAILED"]
    assert fine.calls == ["start", "epoch head 1", "epoch head 2", "epoch head 3", "finish"]
    lines = [str(w.message) for w in caught if "recorder" in str(w.message)]
    assert lines == ["recorder: the server went away; training goes on without it"]


def test_fine_tune_epochs_and_decisions_have_their_own_names():
    from imgclf.training.history import EpochMetrics
    from imgclf.training.tracking import _epoch_values, decision_tags, flat_params

    tuned = _epoch_values(EpochMetrics(2, 1e-4, 0.9, 0.3, 0.8, 0.5, phase="fine-tune"))
    assert tuned == pytest.approx({"fine_tune/train_loss": 0.3, "fine_tune/train_accuracy": 0.9,
                                   "fine_tune/learning_rate": 1e-4, "fine_tune/validation_loss": 0.5,
                                   "fine_tune/validation_accuracy": 0.8})  # fmt: skip
    tags = decision_tags({"training": {"arch": "resnet18"}, "fine_tune": {
        "recipe": {"unfreeze": 2, "epochs": 5}, "decisions": ["unfreeze 2 blocks: 40 photos", "5 epochs"],
        "kept": "fine-tuned"}, "precision_decision": {"line": "fp32 (asked for)", "asked": "fp32"}})  # fmt: skip
    assert tags["imgclf.fine_tune.kept"] == "fine-tuned"
    assert tags["imgclf.fine_tune.decisions"] == "unfreeze 2 blocks: 40 photos\n5 epochs"
    assert tags["imgclf.fine_tune.recipe"] == '{"epochs": 5, "unfreeze": 2}'
    assert tags["imgclf.precision"] == "fp32 (asked for)" and "imgclf.engine" not in tags
    assert flat_params({"early_stopping": {"patience": 10}, "seed": 1, "weights": None}) == {
        "early_stopping.patience": "10", "seed": "1", "weights": "None"}
