"""Model files from elsewhere: every metadata field checked on load, one schema for both kinds,
the format told by content, nothing fetched from the network; fuzzed with Hypothesis."""

import json
import math
import os
import re
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
    ("stored_features.images", 0, "stored_features.images"),
    ("stored_features.images", "18", "stored_features.images"),
    ("stored_features.held_out", 10**6, "more than images"),
    ("stored_features.dtype", "pickle", "stored_features.dtype"),
    ("stored_features", [18], "stored_features"),
    ("trained_on_from", {"sha256": "ab"}, "trained_on_from.sha256"),
    ("trained_on_from", {"sha256": "0" * 64, "labels": [""]}, "trained_on_from.labels.0"),
    ("trained_on_from", {}, "missing trained_on_from.sha256"),
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
          "preprocessing.mean", "preprocessing.std", "labels.0", "preprocessing.mean.1", "versions",
          "stored_features", "stored_features.images", "stored_features.held_out", "stored_features.dtype",
          "trained_on_from", "trained_on_from.sha256", "trained_on_from.labels", "multilabel",
          "preprocessing.frame",
          "unknown", "unknown.method", "unknown.k", "unknown.threshold", "unknown.rejection_rate",
          "unknown.bank_images"]  # fmt: skip
NEAR_VALID = st.sampled_from([0, 1, 2, 3, 15, 16, 223, 224, 1024, 1025, -1, 0.25, 0.875, 1.5, 1.51, 1e-300, True,
                              "bicubic", "lanczos", "", "daisy", [0.5, 0.5, 0.5], [1, 1, 1], [0.01, 0.01, 0.01]])  # fmt: skip


#: Each documented range just inside and just outside (and NaN): what a loosened check lets through.
BOUNDARIES = st.sampled_from([
    ("preprocessing.input_size", v) for v in (15, 16, 1024, 1025)] + [
    ("preprocessing.crop_pct", v) for v in (0.249, 0.25, 1.5, 1.501, float("nan"))] + [
    ("preprocessing.mean", [0.5, v, 0.5]) for v in (-0.001, 0.0, 1.0, 1.001, float("nan"))] + [
    ("preprocessing.std", [0.5, 0.5, v]) for v in (0.0099, 0.01, 1.0, 1.001, float("inf"))] + [
    ("num_features", v) for v in (0, 65_537)] + [("format_version", v) for v in (0, 2, 3)] + [
    ("multilabel", {"thresholds": v}) for v in ([0.5] * 3, [0.5, 0.5], [0.0, 1.0, 0.5], [0.5, 0.5, 1.01])] + [
    ("preprocessing.frame", v) for v in ("whole", "crop", "squash")] + [
    ("labels", ["daisy"]), ("labels", ["daisy", "x" * 256, "tulips"]), ("labels", ["daisy", "x" * 255, "tulips"])] + [
    ("stored_features.images", v) for v in (0, 1, 10_000_000, 10_000_001)] + [
    ("stored_features.held_out", v) for v in (-1, 0, 18, 19)] + [
    ("stored_features.dtype", v) for v in ("float16", "float32")] + [
    ("trained_on_from", {"sha256": v}) for v in ("0" * 64, "0" * 63, "0" * 65, "A" * 64, "g" * 64)] + [
    ("trained_on_from", {"sha256": "0" * 64, "labels": v}) for v in (["a"], [], ["x" * 256], "a")] + [
    ("unknown.k", v) for v in (0, 1, 1000, 1001)] + [("unknown.threshold", v) for v in (-0.001, 0.0, 2.0, 2.001)] + [
    ("unknown.rejection_rate", v) for v in (0.0, 1e-9, 0.5, 0.501)] + [("unknown.bank_images", v) for v in (0, 4097)])  # fmt: skip


def mutate(config: dict, data) -> dict | str:
    how = data.draw(st.sampled_from(["replace", "replace", "near", "boundary", "boundary", "delete", "raw"]))
    if how == "raw":
        return data.draw(st.text(max_size=40) | JSON.map(json.dumps))
    if how == "boundary":
        try:
            return changed(config, *data.draw(BOUNDARIES))
        except KeyError:  # a field this kind of file does not carry (an ONNX file keeps no stored features)
            return config
    field = data.draw(st.sampled_from(FIELDS))
    value = DELETE if how == "delete" else data.draw(NEAR_VALID if how == "near" else JSON)
    try:
        return changed(config, field, value)
    except (KeyError, IndexError, TypeError):
        return config


# The oracle: which metadata must load, from the ranges docs/reliability.md states (written out
# here, not imported from imgclf.inference.metadata, so a loosened check fails these tests).
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos")
PREPROCESSING_KEYS = {"input_size", "crop_pct", "interpolation", "mean", "std"}  # and an optional frame


def _number(v) -> bool:
    return type(v) in (int, float)


def _finite_everywhere(v) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, dict):
        return all(_finite_everywhere(x) for x in v.values())
    if isinstance(v, list):
        return all(_finite_everywhere(x) for x in v)
    return True


def _valid_unknown(u) -> bool:
    """docs/reliability.md's ranges of the unknown-input detector's metadata."""
    if u is None:
        return True
    return (isinstance(u, dict) and u.get("method") == "knn-cosine" and type(u.get("k")) is int and 1 <= u["k"] <= 1000
            and _number(u.get("threshold")) and 0 <= u["threshold"] <= 2
            and _number(u.get("rejection_rate")) and 0 < u["rejection_rate"] <= 0.5
            and type(u.get("bank_images")) is int and 1 <= u["bank_images"] <= 4096)  # fmt: skip


def documented_valid(config, kind: str) -> bool:
    """Whether ``config`` is within every documented type and range (``kind``: imgclf or onnx)."""
    if not isinstance(config, dict) or not _finite_everywhere(config):
        return False
    labels, arch, p = config.get("labels"), config.get("arch"), config.get("preprocessing")
    checks = [
        isinstance(labels, list) and 2 <= len(labels) <= 100_000 and len(set(map(str, labels))) == len(labels)
        and all(isinstance(x, str) and 1 <= len(x) <= 255 for x in labels),
        isinstance(arch, str) and 1 <= len(arch) <= 200,
        isinstance(p, dict) and set(p) - {"frame"} == PREPROCESSING_KEYS and p.get("frame", "crop") in ("crop", "whole"),
        _multilabel_valid(config.get("multilabel"), labels),
        kind == "imgclf" or "format_version" not in config or (type(config["format_version"]) is int
                                                               and 1 <= config["format_version"] <= 2),
        type(config.get("tta", False)) is bool,
        config.get("metrics") is None or isinstance(config["metrics"], dict),
        config.get("versions") is None or (isinstance(config["versions"], dict)
                                           and all(isinstance(v, str) for v in config["versions"].values())),
        _valid_unknown(config.get("unknown")),
    ]  # fmt: skip
    if all(checks):
        size, crop, mean, std = p["input_size"], p["crop_pct"], p["mean"], p["std"]
        checks += [
            type(size) is int and 16 <= size <= 1024,
            _number(crop) and 0.25 <= crop <= 1.5,
            p["interpolation"] in INTERPOLATIONS,
            isinstance(mean, list) and len(mean) == 3 and all(_number(m) and 0 <= m <= 1 for m in mean),
            isinstance(std, list) and len(std) == 3 and all(_number(s) and 0.01 <= s <= 1 for s in std),
        ]
    if kind == "imgclf":
        name, features = config.get("timm_name"), config.get("num_features")
        checks += [
            config.get("format") == "imgclf",
            type(config.get("format_version")) is int and config["format_version"] in ((2,) if config.get("multilabel")
                                                                                  is not None else (1, 2)),
            isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_.\-]+", name) is not None and len(name) <= 200,
            type(features) is int and 1 <= features <= 65_536,
            config.get("training") is None or isinstance(config["training"], dict),  # an ONNX file has none
            _stored_features_valid(config.get("stored_features")),
            _trained_on_from_valid(config.get("trained_on_from")),
        ]
    return all(checks)


def _multilabel_valid(said, labels) -> bool:
    """docs/model-file.md: absent, or one threshold in [0, 1] per label (format version 2)."""
    if said is None:
        return True
    thresholds = said.get("thresholds") if isinstance(said, dict) else None
    return (isinstance(thresholds, list) and isinstance(labels, list) and len(thresholds) == len(labels)
            and len(thresholds) >= 2 and all(_number(t) and 0 <= t <= 1 for t in thresholds))  # fmt: skip


def _stored_features_valid(said) -> bool:
    """docs/reliability.md: absent, or images 1 to 10,000,000, held_out 0 to images, dtype float16."""
    if said is None:
        return True
    if not isinstance(said, dict):
        return False
    images, held = said.get("images"), said.get("held_out")
    return (type(images) is int and 1 <= images <= 10_000_000 and type(held) is int and 0 <= held <= images
            and said.get("dtype") == "float16")  # fmt: skip


def _trained_on_from_valid(said) -> bool:
    """docs/reliability.md: absent, or a sha256 of 64 lowercase hex digits and optional labels."""
    if said is None:
        return True
    if not isinstance(said, dict) or not isinstance(said.get("sha256"), str):
        return False
    labels = said.get("labels")
    return re.fullmatch(r"[0-9a-f]{64}", said["sha256"]) is not None and (labels is None or (
        isinstance(labels, list) and len(labels) <= 100_000 and all(isinstance(x, str) and 1 <= len(x) <= 255
                                                                    for x in labels)))  # fmt: skip


def fits_the_weights(config: dict, original: dict, kind: str) -> bool:
    """Valid metadata must also agree with the file's network: 3 labels; for an .imgclf the same
    timm architecture and feature width; for an ONNX graph its 224-pixel input."""
    if len(config["labels"]) != 3:
        return False
    if kind == "imgclf":
        bank = (config.get("unknown") or {}).get("bank_images", original["unknown"]["bank_images"])
        return (config["timm_name"] == original["timm_name"] and config["num_features"] == original["num_features"]
                and bank == original["unknown"]["bank_images"])  # fmt: skip
    return config["preprocessing"]["input_size"] == 224


def parsed_json(config):
    """A mutated config as the loader will read it (raw text that is not JSON: None, never valid)."""
    if not isinstance(config, str):
        return config
    try:
        return json.loads(config)
    except (ValueError, RecursionError):
        return None


def check_against_the_oracle(path, config, original, kind: str, load) -> None:
    must_load = documented_valid(config, kind) and fits_the_weights(config, original, kind)
    try:
        model = load()
    except ModelFileError as e:
        assert "\n" not in str(e) and str(e).startswith(str(path))
        assert not must_load, f"refused metadata within the documented ranges: {e}"
        event("refused")
        return
    assert must_load, f"loaded metadata outside the documented ranges: {json.dumps(config)[:300]}"
    event("loaded")
    assert model.predict(DAISY).label in model.labels  # what loads also predicts


@settings(FUZZ, max_examples=600 if EXPLORE else 30)
@given(data=st.data())
def test_fuzzed_imgclf_metadata(data, model_path, tensors, tmp_path):
    original = read_model_config(model_path)
    config = mutate(original, data)
    path = with_metadata(tensors, tmp_path / "fuzz.imgclf", config)
    check_against_the_oracle(path, parsed_json(config), original, "imgclf", lambda: load_model(path, engine="torch"))


@settings(FUZZ, max_examples=240 if EXPLORE else 12)
@given(data=st.data())
def test_fuzzed_onnx_metadata(data, onnx_path, tmp_path):
    import onnx

    original = json.loads({p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}["imgclf"])
    config = mutate(original, data)
    path = onnx_with_metadata(onnx_path, tmp_path / "fuzz.onnx", config)
    check_against_the_oracle(path, parsed_json(config), original, "onnx", lambda: load_model(path))


@pytest.mark.parametrize("field", ["preprocessing.crop_pct", "preprocessing.mean.1", "preprocessing.std.2",
                                   "metrics.micro_accuracy", "versions"])  # fmt: skip
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_infinity_are_refused_anywhere(field, value, model_path, tensors, onnx_path, tmp_path):
    """docs/reliability.md: "no NaN or infinity anywhere" (Python's json writes them; JSON has neither)."""
    import onnx

    def with_value(config: dict) -> dict:
        config = json.loads(json.dumps(config))
        *parents, last = field.split(".")
        target = config
        for key in parents:
            if isinstance(target, dict) and not isinstance(target.get(key), (dict, list)):
                target[key] = {}  # "metrics": null in the small model's file
            target = target[key] if isinstance(target, dict) else target[int(key)]
        target[int(last) if isinstance(target, list) else last] = value
        return config

    config = with_value(read_model_config(model_path))
    path = with_metadata(tensors, tmp_path / "nan.imgclf", config)
    with pytest.raises(ModelFileError, match="not a finite number") as e:
        load_model(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)
    onnx_config = json.loads({p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}["imgclf"])
    onnx_file = onnx_with_metadata(onnx_path, tmp_path / "nan.onnx", with_value(onnx_config))
    with pytest.raises(ModelFileError, match="not a finite number"):
        load_model(onnx_file)
