"""Finding, labelling, splitting and decoding images."""

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf import DataError, ImageData, ImageDecodeError, load_images_from_directory, train_test_split
from imgclf.data.images import check_labels, find_image_files
from imgclf.data.imaging import MAX_PIXELS, Preprocessing, load_array, open_image
from imgclf.data.splits import stratified_folds

from .conftest import FLOWERS, PREDICT


def test_folder_labels_sorted_and_any_depth(tmp_path):
    (tmp_path / "zebra" / "deep" / "deeper").mkdir(parents=True)
    (tmp_path / "ant").mkdir()
    src = sorted((FLOWERS / "daisy").glob("*.jpg"))
    (tmp_path / "zebra" / "deep" / "deeper" / "a.jpg").write_bytes(src[0].read_bytes())
    (tmp_path / "ant" / "b.JPG").write_bytes(src[1].read_bytes())
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    images = load_images_from_directory(tmp_path)
    assert sorted(im.label for im in images) == ["ant", "zebra"]
    assert check_labels(images) == ["ant", "zebra"]


def test_split_is_stratified_and_deterministic():
    images = load_images_from_directory(FLOWERS)
    train, test = train_test_split(images, test_fraction=0.2, seed=7)
    assert Counter(im.label for im in test) == {
        lbl: 8 for lbl in ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
    }
    assert len(train) == 160 and not {im.name for im in train} & {im.name for im in test}
    again_train, again_test = train_test_split(list(reversed(images)), test_fraction=0.2, seed=7)
    assert [im.name for im in again_test] == [im.name for im in test]
    assert [im.name for im in again_train] == [im.name for im in train]
    _, other = train_test_split(images, test_fraction=0.2, seed=8)
    assert {im.name for im in other} != {im.name for im in test}


def test_folds_cover_every_image_once():
    images = load_images_from_directory(FLOWERS)
    folds = stratified_folds(images, k=5, seed=1)
    tested = [im.name for _, test in folds for im in test]
    assert sorted(tested) == sorted(im.name for im in images)
    assert all(
        Counter(im.label for im in test) == {lbl: 8 for lbl in Counter(i.label for i in images)} for _, test in folds
    )


def test_missing_folder_and_too_few_labels(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        load_images_from_directory(tmp_path / "nope")
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "a.jpg").write_bytes((PREDICT / "classic-daisy.jpg").read_bytes())
    with pytest.raises(DataError, match="at least 2 labels"):
        check_labels(load_images_from_directory(tmp_path))


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_every_mode_becomes_rgb():
    photo = Image.open(PREDICT / "classic-daisy.jpg").convert("RGB").resize((64, 48))
    cases = {
        "L": _encode(photo.convert("L"), "PNG"),
        "P": _encode(photo.convert("P"), "GIF"),
        "RGBA": _encode(photo.convert("RGBA"), "PNG"),
        "CMYK": _encode(photo.convert("CMYK"), "JPEG"),
        "I;16": _encode(Image.fromarray(np.asarray(photo.convert("L"), np.uint16) * 257), "PNG"),
        "BMP": _encode(photo, "BMP"),
        "WEBP": _encode(photo, "WEBP"),
        "TIFF": _encode(photo, "TIFF"),
    }
    grey = np.asarray(photo.convert("L"), np.float64)
    for mode, data in cases.items():
        img = open_image(data, mode)
        assert img.mode == "RGB" and img.size == (64, 48), mode
        # content survives: brightness tracks the original photo
        assert np.corrcoef(np.asarray(img.convert("L"), np.float64).ravel(), grey.ravel())[0, 1] > 0.9, mode


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert open_image(_encode(rgba, "PNG")).getpixel((3, 3)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    photo = Image.open(PREDICT / "classic-daisy.jpg").convert("RGB").resize((80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img = open_image(_encode(photo, "JPEG", exif=exif))
    assert img.size == (40, 80)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"this is a text file, not a picture", "not an image"),
        ((PREDICT / "classic-daisy.jpg").read_bytes()[:3000], "corrupt or truncated"),
    ],
)
def test_bad_bytes_raise_clear_errors(data, message):
    with pytest.raises(ImageDecodeError, match=message) as e:
        open_image(data, "bad.jpg")
    assert str(e.value).startswith("bad.jpg: ")


def test_decompression_bomb_refused_before_decoding():
    side = int(MAX_PIXELS**0.5) + 100
    data = _encode(Image.new("L", (side, side)), "PNG", optimize=True)
    with pytest.raises(ImageDecodeError, match="more pixels than the"):
        open_image(data, "bomb.png")


def test_preprocessing_matches_timm_transform():
    """Our numpy preprocessing equals timm's eval transform on real photos."""
    timm_data = pytest.importorskip("timm.data")
    prep = Preprocessing(224, 0.875, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    transform = timm_data.create_transform(input_size=(3, 224, 224), crop_pct=0.875, interpolation="bicubic",
                                           mean=prep.mean, std=prep.std)  # fmt: skip
    for f in sorted((FLOWERS / "roses").glob("*.jpg"))[:5]:
        ours = load_array(f, prep, fast_decode=False)
        theirs = transform(Image.open(f).convert("RGB")).numpy()
        assert ours.shape == (3, 224, 224)
        assert np.abs(ours - theirs).max() < 1e-5


def test_hidden_and_tool_folders_are_skipped(tmp_path):
    """Defect 11: .ipynb_checkpoints became a label, __MACOSX stopped training, ._*.jpg counted as images."""
    photo = (PREDICT / "classic-daisy.jpg").read_bytes()
    for rel in ["daisy/a.jpg", "tulips/b.jpg", "tulips/sub/c.jpg",
                ".ipynb_checkpoints/x.jpg", "__MACOSX/daisy/._a.jpg", "daisy/._a.jpg", "daisy/.hidden/d.jpg",
                "tulips/.DS_Store", "tulips/@eaDir/b.jpg"]:  # fmt: skip
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(photo if not rel.rsplit("/", 1)[-1].startswith("._") else b"\x00\x05\x16\x07")
    images = load_images_from_directory(tmp_path)
    assert sorted((im.label, Path(im.name).name) for im in images) == [("daisy", "a.jpg"), ("tulips", "b.jpg"),
                                                                        ("tulips", "c.jpg")]  # fmt: skip
    assert [p.name for p in find_image_files([tmp_path / "daisy", tmp_path / "daisy" / "._a.jpg"])] == [
        "a.jpg",
        "._a.jpg",
    ]


def test_layout_mistakes_say_what_layout_is_expected(tmp_path):
    """Defect 11: images directly in FOLDER said "no images found"; a file given as FOLDER, "no such folder"."""
    photo = (PREDICT / "classic-daisy.jpg").read_bytes()
    (tmp_path / "a.jpg").write_bytes(photo)
    (tmp_path / "b.jpg").write_bytes(photo)
    with pytest.raises(DataError, match=r"2 image\(s\) lie directly in the folder.*subfolder per label"):
        load_images_from_directory(tmp_path)
    said = r"is a file, neither a folder nor a manifest \(.csv, .tsv, .jsonl or .parquet\); give a folder with one"
    with pytest.raises(DataError, match=said):
        load_images_from_directory(tmp_path / "a.jpg")
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "c.jpg").write_bytes(photo)
    with pytest.warns(UserWarning, match=r"ignored 2 image\(s\) directly in"):
        assert [im.label for im in load_images_from_directory(tmp_path)] == ["cats"]


def test_image_data_repr_is_short():
    """Defect 12: the default repr of in-memory images printed every byte."""
    photo = (PREDICT / "classic-daisy.jpg").read_bytes()
    assert (
        repr(ImageData(photo, "daisy", "upload-1"))
        == f"ImageData(<{len(photo):,} bytes>, name='upload-1', label='daisy')"
    )
    assert (
        repr(ImageData(Path("p/daisy/1.jpg"), "daisy", "p/daisy/1.jpg")) == "ImageData('p/daisy/1.jpg', label='daisy')"
    )


def test_extremely_narrow_image_is_refused_before_resizing():
    """A 1x2000 PNG (a few hundred bytes) was resized to 256x512000 before its centre crop:
    about 400 MB for one image in `predict` or training, where serve's decode budget does not apply."""
    from imgclf.errors import ImageTooLargeError

    prep = Preprocessing(224, 0.875, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    with pytest.raises(ImageTooLargeError, match="1x2000; resizing an image this narrow"):
        load_array(_encode(Image.new("RGB", (1, 2000)), "PNG"), prep, "strip.png")
    panorama = load_array(_encode(Image.new("RGB", (3200, 200)), "PNG"), prep, "panorama.png")  # 16:1 is fine
    assert panorama.shape == (3, 224, 224)
