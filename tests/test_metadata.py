"""Model files from elsewhere: every metadata field checked on load, one schema for both kinds,
the format told by content, nothing fetched from the network; fuzzed with Hypothesis."""

import json
import os
import socket

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from imgclf import ImageClassifier, ModelFileError, OnnxClassifier, load_model  # noqa: E402
from imgclf.inference.model import read_model_config  # noqa: E402

from .conftest import PREDICT  # noqa: E402

DAISY = PREDICT / "classic-daisy.jpg"
#: Derandomized in the normal suite (the same examples every run); IMGCLF_FUZZ=explore draws
#: new ones, 20 times as many (run it after changing the schema or the loaders).
EXPLORE = os.environ.get("IMGCLF_FUZZ") == "explore"
FUZZ = settings(
    deadline=None,
    database=None,
    derandomize=not EXPLORE,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def model_path(small_model_file):
    return small_model_file


@pytest.fixture(scope="module")
def tensors(model_path):
    from safetensors.torch import load_file

    return load_file(str(model_path))


@pytest.fixture(scope="module")
def onnx_path(small_onnx_model):
    return small_onnx_model


def with_metadata(tensors, path, config) -> str:
    """Write the model's tensors under ``config`` (a dict, or raw text) as metadata."""
    from safetensors.torch import save_file

    raw = config if isinstance(config, str) else json.dumps(config)
    save_file(tensors, str(path), metadata={"imgclf": raw})
    return path


def onnx_with_metadata(onnx_path, path, config):
    import onnx

    graph = onnx.load(str(onnx_path))
    for p in graph.metadata_props:
        if p.key == "imgclf":
            p.value = config if isinstance(config, str) else json.dumps(config)
    onnx.save(graph, str(path))
    return path


def changed(config: dict, dotted: str, value) -> dict:
    config = json.loads(json.dumps(config))
    *parents, last = dotted.split(".")
    target = config
    for key in parents:
        target = target[key]
    if value is DELETE:
        del target[last]
    else:
        target[last] = value
    return config


DELETE = object()

BAD_FIELDS = [
    ("preprocessing.input_size", 100000, "preprocessing.input_size"),  # was: 22 GB and the OOM killer
    ("preprocessing.input_size", "224", "preprocessing.input_size"),
    ("format_version", "x", "format_version"),
    ("num_features", "abc", "num_features"),
    ("num_features", 10**12, "num_features"),
    ("preprocessing", {}, "preprocessing"),
    ("preprocessing.crop_pct", 0, "crop_pct"),
    ("preprocessing.crop_pct", 1e-9, "crop_pct"),
    ("preprocessing.interpolation", "evil", "interpolation"),
    ("preprocessing.mean", [0.5, 0.5], "mean"),
    ("preprocessing.std", [0.5, 0.0, 0.5], "std"),
    ("labels", ["daisy", "daisy", "tulips"], "appears twice"),
    ("labels", ["daisy", "", "tulips"], "labels.1"),
    ("labels", "daisy,dandelion,tulips", "labels"),
    ("tta", "yes", "tta"),
    ("metrics", "great", "metrics"),
    ("arch", 7, "arch"),
    ("labels", DELETE, "missing labels"),
    ("format", DELETE, "missing format"),
]


@pytest.mark.parametrize("field, value, message", BAD_FIELDS)
def test_each_malformed_field_is_one_clear_line(field, value, message, model_path, tensors, tmp_path):
    """Defect 5: every field's type and range is checked, and the message names the field."""
    path = with_metadata(tensors, tmp_path / "bad.imgclf", changed(read_model_config(model_path), field, value))
    with pytest.raises(ModelFileError, match=message.replace(".", r"\.")) as e:
        load_model(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def test_label_count_must_match_the_weights(model_path, tensors, tmp_path):
    config = read_model_config(model_path)
    config["labels"] = ["daisy", "dandelion", "tulips", "roses"]
    with pytest.raises(ModelFileError, match="weights are for 3 labels .* metadata names 4 labels"):
        load_model(with_metadata(tensors, tmp_path / "four.imgclf", config))


def test_loading_never_reaches_for_the_network(model_path, tensors, tmp_path, monkeypatch):
    """Defect 5: timm_name="hf-hub:..." made timm fetch a config from the hub while loading."""
    config = changed(read_model_config(model_path), "timm_name", "hf-hub:evil/model")
    path = with_metadata(tensors, tmp_path / "hub.imgclf", config)
    connects = []
    monkeypatch.setattr(socket.socket, "connect", lambda self, addr: connects.append(addr))
    monkeypatch.setattr(socket, "create_connection", lambda addr, *a, **k: connects.append(addr))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ModelFileError, match="timm_name"):
        load_model(path)
    # a name timm would have to fetch, even without the hf-hub prefix
    with pytest.raises(ModelFileError, match="not an architecture this timm knows"):
        load_model(with_metadata(tensors, tmp_path / "unknown.imgclf", changed(config, "timm_name", "evil_net_9000")))
    assert connects == []


def test_onnx_files_are_checked_against_their_graph(onnx_path, tmp_path):
    """Defect 5: an empty .onnx and one whose input size disagrees with its metadata end in one line."""
    import onnx

    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ModelFileError, match="empty"):
        load_model(tmp_path / "empty.onnx")
    config = json.loads({p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}["imgclf"])
    with pytest.raises(ModelFileError, match=r"input is .*224, 224.* metadata says \(N, 3, 256, 256\)"):
        load_model(
            onnx_with_metadata(onnx_path, tmp_path / "size.onnx", changed(config, "preprocessing.input_size", 256))
        )
    with pytest.raises(ModelFileError, match="preprocessing.input_size"):
        load_model(
            onnx_with_metadata(onnx_path, tmp_path / "huge.onnx", changed(config, "preprocessing.input_size", 10**5))
        )
    with pytest.raises(ModelFileError, match="4 labels|names 4"):
        load_model(onnx_with_metadata(onnx_path, tmp_path / "labels.onnx", changed(config, "labels", list("abcd"))))


def test_serve_refuses_a_bad_model_at_start_up(model_path, tensors, tmp_path):
    """Defect 5: under serve a bad file was an HTTP 500 per request; now the server does not start."""
    from imgclf.serve import create_app

    path = with_metadata(tensors, tmp_path / "bad.imgclf",
                         changed(read_model_config(model_path), "preprocessing.interpolation", "evil"))  # fmt: skip
    with pytest.raises(ModelFileError, match="interpolation"):
        create_app(path)


def test_format_is_told_by_content_not_suffix(model_path, onnx_path, tmp_path):
    """Defects 4 and 12: one public loader for both kinds, by first bytes (load_model('x.onnx') gave a
    safetensors error); a renamed file loads as what it is."""
    import shutil

    assert isinstance(load_model(onnx_path), OnnxClassifier)
    shutil.copy(onnx_path, tmp_path / "model.bin")
    shutil.copy(model_path, tmp_path / "model.onnx")  # a safetensors model wearing an .onnx name
    assert isinstance(load_model(tmp_path / "model.bin"), OnnxClassifier)
    torch_model = load_model(tmp_path / "model.onnx")
    assert isinstance(torch_model, ImageClassifier)
    assert torch_model.predict(DAISY).label == load_model(tmp_path / "model.bin").predict(DAISY).label == "daisy"


# --- Hypothesis: any metadata is a working model or one ModelFileError line, never another exception ---

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
FIELDS = ["labels", "arch", "timm_name", "num_features", "format", "format_version", "tta", "metrics", "training",
          "preprocessing", "preprocessing.input_size", "preprocessing.crop_pct", "preprocessing.interpolation",
          "preprocessing.mean", "preprocessing.std", "labels.0", "preprocessing.mean.1", "versions"]  # fmt: skip
NEAR_VALID = st.sampled_from([0, 1, 2, 3, 15, 16, 223, 224, 1024, 1025, -1, 0.25, 0.875, 1.5, 1.51, 1e-300, True,
                              "bicubic", "lanczos", "", "daisy", [0.5, 0.5, 0.5], [1, 1, 1], [0.01, 0.01, 0.01]])  # fmt: skip


def mutate(config: dict, data) -> dict | str:
    how = data.draw(st.sampled_from(["replace", "replace", "near", "delete", "raw"]))
    if how == "raw":
        return data.draw(st.text(max_size=40) | JSON.map(json.dumps))
    field = data.draw(st.sampled_from(FIELDS))
    value = DELETE if how == "delete" else data.draw(NEAR_VALID if how == "near" else JSON)
    try:
        return changed(config, field, value)
    except (KeyError, IndexError, TypeError):
        return config


@settings(FUZZ, max_examples=600 if EXPLORE else 30)
@given(data=st.data())
def test_fuzzed_imgclf_metadata(data, model_path, tensors, tmp_path):
    path = with_metadata(tensors, tmp_path / "fuzz.imgclf", mutate(read_model_config(model_path), data))
    try:
        model = load_model(path, engine="torch")
    except ModelFileError as e:
        assert "\n" not in str(e) and str(e).startswith(str(path))
        event("refused")
        return
    event("loaded")
    assert model.predict(DAISY).label in model.labels  # what loads also predicts


@settings(FUZZ, max_examples=240 if EXPLORE else 12)
@given(data=st.data())
def test_fuzzed_onnx_metadata(data, onnx_path, tmp_path):
    import onnx

    config = json.loads({p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}["imgclf"])
    path = onnx_with_metadata(onnx_path, tmp_path / "fuzz.onnx", mutate(config, data))
    try:
        model = load_model(path)
    except ModelFileError as e:
        assert "\n" not in str(e) and str(e).startswith(str(path))
        event("refused")
        return
    event("loaded")
    assert model.predict(DAISY).label in model.labels
