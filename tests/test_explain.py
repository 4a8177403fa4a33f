"""Explanations (class activation maps): the arithmetic, the full-size map, the files, torch and torch-free alike."""

from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from imgclf.data.imaging import Preprocessing, load_array
from imgclf.inference.explain import crop_box, file_stem, full_size_map

from .conftest import FLOWERS, PREDICT

PREP = Preprocessing(224, 0.875, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
DAISY = sorted((FLOWERS / "daisy").glob("*.jpg"))[10]


@pytest.fixture(scope="module")
def rotated(tmp_path_factory):
    """A real, wide photo stored sideways with EXIF orientation 6: upright it is taller than wide."""
    path = tmp_path_factory.mktemp("exif") / "sideways.jpg"
    photo = Image.open(PREDICT / "classic-daisy.jpg").convert("RGB").resize((400, 260))
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.save(path, "JPEG", exif=exif, quality=90)
    return path


def test_full_size_map_lays_the_crop_back_and_holds_the_minimum_outside():
    cells = np.arange(49, dtype=np.float32).reshape(7, 7)
    full = full_size_map(cells, (300, 200), PREP)  # wide: resized to 384x256, crop columns 80..304
    assert full.shape == (200, 300) and full.dtype == np.float32
    left, top, right, bottom = crop_box((300, 200), PREP)
    assert (left, right) == (80 * 300 / 384, 304 * 300 / 384) and (top, bottom) == (16 * 200 / 256, 240 * 200 / 256)
    outside = np.ones(full.shape, bool)
    outside[int(np.ceil(top)) : int(bottom), int(np.ceil(left)) : int(right)] = False
    assert np.all(full[:, : int(left)] == cells.min()) and np.all(full[:, int(np.ceil(right)) :] == cells.min())
    assert np.all(full[: int(top)] == cells.min())
    inside = full[int(np.ceil(top)) : int(bottom), int(np.ceil(left)) : int(right)]
    assert inside.min() >= cells.min() and inside.max() <= cells.max()
    # the map still rises left to right and top to bottom, as the cells do
    assert np.all(np.diff(inside, axis=1) >= -1e-5) and np.all(np.diff(inside, axis=0) >= -1e-5)
    assert inside[0, 0] == pytest.approx(cells[0, 0]) and inside[-1, -1] == pytest.approx(cells[-1, -1])
    flat = full_size_map(np.full((7, 7), 2.5, np.float32), (300, 200), PREP)
    assert np.all(flat == 2.5)
    whole = Preprocessing(224, 0.875, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), frame="whole")  # multi-label
    assert crop_box((300, 200), whole) == (0, 0, 300, 200)
    squashed = full_size_map(cells, (300, 200), whole)
    assert squashed[0, 0] == cells[0, 0] and squashed[-1, -1] == cells[-1, -1] and squashed[:, 0].max() > cells.min()


def test_file_stems_never_collide_and_take_any_bytes():
    a, b = file_stem("a/x.jpg"), file_stem("b/x.jpg")
    assert a != b and a.startswith("x.jpg-") and b.startswith("x.jpg-")
    odd = file_stem(os.fsdecode(b"pics/caf\xe9 one.jpg"))
    assert odd.encode("ascii") and odd.startswith("caf_one.jpg-")


def test_the_map_is_the_head_applied_to_the_last_feature_map(small_model):
    """CAM at the feature map's resolution is W . F + b; its spatial mean is the logit; the
    graph's probabilities are the model's."""
    import torch

    model = small_model
    arrays = np.stack([load_array(DAISY, model.preprocessing), load_array(PREDICT / "classic-tulip.jpg",
                                                                          model.preprocessing)])  # fmt: skip
    probs, scores, maps = model._explained(arrays)
    assert maps.shape == (2, len(model.labels), 7, 7)
    with torch.no_grad():
        fmap = model.backbone.forward_features(torch.from_numpy(arrays)).numpy()
        logits = model.head(model.backbone(torch.from_numpy(arrays))).numpy()
    weight = model.head.weight.detach().numpy()
    bias = model.head.bias.detach().numpy()
    expected = np.einsum("ck,nkhw->nchw", weight, fmap) + bias[None, :, None, None]
    np.testing.assert_allclose(maps, expected, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(maps.mean(axis=(2, 3)), logits, atol=1e-4)
    np.testing.assert_allclose(probs, model.predict_proba_arrays(arrays), atol=1e-5)
    if model.unknown_ is not None:
        np.testing.assert_allclose(scores, model.predict_arrays(arrays)[1], atol=1e-5)


def test_a_flip_averaged_model_flips_the_mirror_image_map_back(small_model):
    import torch

    network = small_model.scored_network(tta=True, maps=True)
    plain = small_model.scored_network(tta=False, maps=True)
    x = torch.from_numpy(load_array(DAISY, small_model.preprocessing)[None])
    with torch.no_grad():
        averaged = network(x)[-1]
        expected = (plain(x)[-1] + torch.flip(plain(torch.flip(x, dims=[3]))[-1], dims=[3])) / 2
    torch.testing.assert_close(averaged, expected, atol=1e-5, rtol=1e-5)


def test_explain_gives_a_full_size_upright_map_and_the_same_from_the_onnx_file(small_model, small_onnx_model,
                                                                                rotated):  # fmt: skip
    from imgclf.inference.runtime import load_onnx_model

    torch_model = small_model.explain(rotated)
    assert torch_model.map.shape == (400, 260)  # EXIF orientation 6: the 400x260 photo stands upright
    left, top, right, bottom = torch_model.crop
    assert (left, right) == (pytest.approx(16 * 260 / 256), pytest.approx(240 * 260 / 256)) and top > 80
    low = torch_model.cells.min()
    assert np.all(torch_model.map[: int(top)] == low) and np.all(torch_model.map[int(np.ceil(bottom)) :] == low)
    assert np.all(torch_model.map[:, : int(left)] == low) and torch_model.map.max() == pytest.approx(
        float(torch_model.cells.max()), abs=0.3 * float(np.ptp(torch_model.cells)))  # fmt: skip
    assert torch_model.label == small_model.predict(rotated).label
    assert torch_model.prediction.probability == pytest.approx(small_model.predict(rotated).probability, abs=1e-5)
    onnx_model = load_onnx_model(small_onnx_model)
    assert onnx_model.config["explain"]["output"] == "class_maps"
    torch_free = onnx_model.explain(rotated)
    assert torch_free.label == torch_model.label
    np.testing.assert_allclose(torch_free.cells, torch_model.cells, atol=1e-4)
    np.testing.assert_allclose(torch_free.map, torch_model.map, atol=1e-4)


def test_predict_explain_writes_an_overlay_and_the_map_for_each_image(small_onnx_model, rotated, tmp_path):
    from imgclf.cli import main

    images = tmp_path / "in"
    for sub in ("a", "b"):
        (images / sub).mkdir(parents=True)
        (images / sub / "same.jpg").write_bytes(DAISY.read_bytes())
    odd = images / os.fsdecode(b"caf\xe9.png")
    odd.write_bytes((PREDICT / "BlackRose.png").read_bytes())
    (images / "sideways.jpg").write_bytes(rotated.read_bytes())
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(["predict", str(small_onnx_model), str(images), "--json", "--explain", str(tmp_path / "why")]) == 0
    results = json.loads(out.getvalue())
    index = [json.loads(line) for line in (tmp_path / "why" / "index.jsonl").read_text().splitlines()]
    assert len(results) == len(index) == 4
    assert len({r["explain"]["map"] for r in results}) == 4  # a/same.jpg and b/same.jpg do not collide
    for row, entry in zip(results, index):
        assert entry["label"] == row["label"] and entry["map"] == row["explain"]["map"]
        values = np.load(entry["map"], allow_pickle=False)
        source = Image.open(images / "sideways.jpg" if "sideways" in entry["path"] else
                            (PREDICT / "BlackRose.png" if entry["path_bytes"] else DAISY))  # fmt: skip
        width, height = source.size
        if "sideways" in entry["path"]:
            width, height = height, width
        assert values.shape == (height, width) and values.dtype == np.float32
        with Image.open(entry["overlay"]) as picture:
            assert picture.size == (width, height) and picture.format == "PNG"
    assert sum(1 for e in index if e["path_bytes"]) == 1


@pytest.mark.parametrize("where", ["", " "])
def test_an_empty_explain_folder_is_refused_not_ignored(small_onnx_model, where, capsys):
    from imgclf.cli import main

    assert main(["predict", str(small_onnx_model), str(DAISY), "--explain", where]) == 2
    assert capsys.readouterr().err.strip() == f"imgclf: error: --explain must be a folder name, got {where!r}"


@pytest.mark.parametrize("inside", [".", "why"])
def test_an_explain_folder_inside_the_images_folder_is_refused(small_onnx_model, inside, tmp_path, capsys):
    """Overlays written among the images were scored as images by the next predict of the folder
    (the bundled predict folder grew three PNG overlays, their maps and an index)."""
    from imgclf.cli import main

    images = tmp_path / "images"
    images.mkdir()
    (images / "daisy.jpg").write_bytes(DAISY.read_bytes())
    assert main(["predict", str(small_onnx_model), str(images), "--explain", str(images / inside)]) == 2
    assert "is inside the images folder" in capsys.readouterr().err
    assert sorted(p.name for p in images.rglob("*")) == ["daisy.jpg"]
    mine = tmp_path / "mine"  # a user's index.jsonl was replaced by this run's list
    mine.mkdir()
    (mine / "index.jsonl").write_text('{"mine": 1}\n')
    assert main(["predict", str(small_onnx_model), str(images), "--explain", str(mine)]) == 2
    assert "holds an index.jsonl that is not imgclf's" in capsys.readouterr().err
    assert (mine / "index.jsonl").read_text() == '{"mine": 1}\n'


def test_http_explain_returns_the_map_cells_and_a_small_png(small_onnx_model, rotated):
    import base64

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from imgclf.inference.runtime import load_onnx_model
    from imgclf.serve import create_app

    with TestClient(create_app(small_onnx_model)) as client:
        plain = client.post("/v1/predict", content=rotated.read_bytes(), headers={"content-type": "image/jpeg"})
        r = client.post("/v1/predict?explain=true", content=rotated.read_bytes(),
                        headers={"content-type": "image/jpeg"})  # fmt: skip
        schema = client.get("/openapi.json").json()["components"]["schemas"]
    assert "explanation" not in plain.json()["results"][0]
    result = r.json()["results"][0]
    ex = result["explanation"]
    assert ex["label"] == result["label"] == plain.json()["results"][0]["label"]
    assert (ex["image_width"], ex["image_height"]) == (260, 400)
    expected = load_onnx_model(small_onnx_model).explain(rotated, map_size=False)
    np.testing.assert_allclose(np.asarray(ex["cells"]), expected.cells, atol=1e-4)
    np.testing.assert_allclose(ex["crop"], expected.crop, atol=0.01)
    with Image.open(io.BytesIO(base64.b64decode(ex["png"]))) as png:
        assert png.size == (7, 7) and png.mode == "L"
        assert np.asarray(png).argmax() == expected.cells.argmax()
    assert "ImageExplanation" in schema and "explanation" in schema["ExplainedImageResult"]["properties"]


def test_report_top_losses_show_what_the_model_looked_at(small_onnx_model, tmp_path):
    from imgclf import load_images_from_directory
    from imgclf.inference.runtime import load_onnx_model
    from imgclf.insight.report import write_report

    from .conftest import small_flower_folder

    images = load_images_from_directory(small_flower_folder(tmp_path / "flowers", per_class=1))
    page = write_report(load_onnx_model(small_onnx_model), images, tmp_path / "report")
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert len(data["top_losses"]) == 3 and all(t["overlay"].startswith("explained/") for t in data["top_losses"])
    for t in data["top_losses"]:
        with Image.open(tmp_path / "report" / t["overlay"]) as picture:
            assert 100 < max(picture.size) <= 256 and picture.mode == "RGB"
    assert page.read_text().count("class='overlay'") == 3
