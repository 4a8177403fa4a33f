"""The Python API the obvious way (defect 12): the objects the loaders return go straight back in,
folders and file objects are accepted, errors name the file, and objects print usefully."""

import io
import json

import pytest

pytest.importorskip("torch")

from imgclf import (  # noqa: E402
    ImageClassificationTrainer,
    ImageDecodeError,
    image_from_bytes,
    load_images_from_directory,
)

from .conftest import PREDICT, small_flower_folder  # noqa: E402

DAISY = PREDICT / "classic-daisy.jpg"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return small_flower_folder(tmp_path_factory.mktemp("api"), per_class=2)


def test_image_data_from_the_loader_goes_straight_back_in(small_model, folder):
    images = load_images_from_directory(folder)
    first = small_model.predict(images[0])
    assert first.label in small_model.labels
    batch = small_model.predict_batch(images)
    assert [p.scores for p in batch][0] == pytest.approx(first.scores, abs=1e-5) and len(batch) == len(images)
    assert [p.label for p in small_model.predict_batch(folder)] == [p.label for p in batch]  # a folder, sorted
    assert small_model.predict(image_from_bytes(DAISY.read_bytes())).label == "daisy"


def test_file_objects_are_accepted(small_model):
    with open(DAISY, "rb") as f:
        from_file = small_model.predict(f)
    from_bytes_io = small_model.predict(io.BytesIO(DAISY.read_bytes()))
    assert from_file.label == from_bytes_io.label == "daisy"
    assert from_file.scores == pytest.approx(small_model.predict(DAISY).scores, abs=1e-6)
    with open(DAISY) as text_mode, pytest.raises(ImageDecodeError):  # text mode cannot give image bytes
        small_model.predict(text_mode)


def test_errors_name_the_file(small_model, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really")
    with pytest.raises(ImageDecodeError, match=f"^{broken}: "):
        small_model.predict(broken)
    with pytest.raises(ImageDecodeError, match=f"^{broken}: "):  # was "image 1: ..."
        small_model.predict_batch([DAISY, str(broken)])
    with open(broken, "rb") as f, pytest.raises(ImageDecodeError, match=f"^{broken}: "):
        small_model.predict(f)


def test_fit_and_evaluate_take_a_folder(small_model, folder, workspace):
    """`fit("photos/")` and `evaluate("photos/")` failed with AttributeError."""
    metrics = small_model.evaluate(str(folder))
    assert metrics.count == 6 and metrics.labels == small_model.labels
    model = ImageClassificationTrainer(epochs=2, workspace=workspace, progress=False, engine="torch").fit(str(folder))
    assert model.labels == ["daisy", "dandelion", "tulips"]


def test_useful_reprs(small_model, folder):
    text = repr(small_model)
    assert text.startswith("ImageClassifier(arch='efficientnet_lite0', labels=['daisy', 'dandelion', 'tulips']")
    assert "input_size=224" in text and "<" not in text
    p = small_model.predict(DAISY)
    assert repr(p).startswith(f"Prediction(label='daisy', probability={p.probability:.4f}, known=True, next={{")
    m = small_model.evaluate(folder)
    assert repr(m).startswith(f"MulticlassMetrics(count={m.count}, labels=3, micro_accuracy=") and "[[" not in repr(m)


def test_scores_have_one_shape_in_the_api_and_the_cli(small_model, small_model_file, capsys):
    """`scores` was a dict in CLI JSON but a list in the HTTP API: both are now the API's list."""
    from fastapi.testclient import TestClient

    from imgclf.cli import main
    from imgclf.serve import create_app

    path = small_model_file
    assert main(["predict", str(path), str(DAISY), "--json", "--top-k", "3"]) == 0
    cli = json.loads(capsys.readouterr().out)[0]
    with TestClient(create_app(path, max_batch=1)) as client:
        api = client.post("/v1/predict?top_k=3", content=DAISY.read_bytes(), headers={"content-type": "image/jpeg"})
    api = api.json()["results"][0]
    assert [s["label"] for s in cli["scores"]] == [s["label"] for s in api["scores"]]
    assert [s["probability"] for s in cli["scores"]] == pytest.approx(
        [s["probability"] for s in api["scores"]], abs=1e-4
    )
    python = small_model.predict(DAISY).to_dict(top_k=3)["scores"]
    assert [list(s) for s in python] == [["label", "probability"]] * 3
    assert [s["label"] for s in python] == [s["label"] for s in cli["scores"]]
