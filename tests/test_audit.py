"""The data audit on the bundled photos with planted problems, and on the photos as they are.

One session-wide fixture builds the planted folder and audits it once (computing
the features into the shared test workspace); the other audits read them back.
"""

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")
pytest.importorskip("imagehash")

from imgclf import audit  # noqa: E402
from imgclf.cli import main  # noqa: E402
from imgclf.data.images import ImageData, load_images_from_directory  # noqa: E402
from imgclf.data.imaging import open_image  # noqa: E402
from imgclf.insight import labels as label_model  # noqa: E402
from imgclf.insight import neardup  # noqa: E402
from imgclf.insight.audit import training_warning  # noqa: E402

from .conftest import FLOWERS, PREDICT, SANITY, small_flower_folder  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SUSPECTS_ON_CLEAN_FLOWERS = 10  # documented in the README ("Audit your data")
SANITY_PHOTOS = {"tiny": "pizza.jpg", "small-enough": "canoe2.jpg", "strip": "coffeepot.jpg",
                 "four-to-one": "broccoli.jpg"}  # fmt: skip


def photo(label: str, k: int) -> Path:
    return sorted((FLOWERS / label).glob("*.jpg"))[k]


def reencode(src: Path, dest: Path, scale: float = 1.0, crop: float = 0.0, quality: int = 70) -> None:
    """A copy as people make them: cropped (``crop`` off the left and top), resized, saved again as JPEG."""
    img = Image.open(src).convert("RGB")
    w, h = img.size
    if crop:
        img = img.crop((round(crop * w), round(crop * h), w, h))
    if scale != 1.0:
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
    img.save(dest, "JPEG", quality=quality)


@pytest.fixture(scope="session")
def planted(tmp_path_factory):
    """The 200 bundled photos plus every kind of problem the audit must find, and the test folder."""
    root = tmp_path_factory.mktemp("planted")
    train, test = root / "photos", root / "test"
    shutil.copytree(FLOWERS, train, ignore=shutil.ignore_patterns("LICENSE.txt"))
    shutil.copy(photo("daisy", 3), train / "roses" / "copy-of-a-daisy.jpg")
    reencode(photo("tulips", 5), train / "tulips" / "smaller-copy.jpg", scale=0.8, quality=60)
    reencode(photo("sunflowers", 7), train / "sunflowers" / "cropped-copy.jpg", crop=0.05, quality=90)
    for label, name in (("roses", "BlackRose.png"), ("daisy", "classic-daisy.jpg"), ("tulips", "classic-tulip.jpg")):
        (test / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(PREDICT / name, test / label / name)
    (test / "dandelion").mkdir()
    reencode(photo("dandelion", 9), test / "dandelion" / "leaked.jpg", quality=85)
    moved = {"daisy": photo("sunflowers", 12), "dandelion": photo("roses", 14)}
    for label, src in moved.items():
        shutil.move(train / src.parent.name / src.name, train / label / src.name)
    Image.new("RGB", (300, 200), (250, 250, 250)).save(train / "daisy" / "blank.png")
    # docs/report-and-audit.md: tiny is "a side under 32 pixels", extreme "beyond 4:1"; each boundary
    # tried, on ImageNet photos that are nowhere else in either folder (so no copies)
    for name, label, size in (("tiny", "daisy", (31, 40)), ("small-enough", "daisy", (32, 40)),
                              ("strip", "tulips", (410, 100)), ("four-to-one", "tulips", (400, 100))):  # fmt: skip
        Image.open(SANITY / SANITY_PHOTOS[name]).convert("RGB").resize(size).save(train / label / f"{name}.png")
    (train / "tulips" / "broken.jpg").write_bytes(photo("tulips", 0).read_bytes()[:1500])
    return SimpleNamespace(root=root, train=train, test=test, moved=moved)


@pytest.fixture(scope="session")
def planted_audit(planted, workspace):
    return audit(planted.train, planted.test, workspace=workspace, progress=False)


def at(folder: Path, relative: str) -> str:
    return os.path.join(str(folder), relative)


def test_audit_finds_every_planted_problem(planted, planted_audit):
    result, train, test = planted_audit, planted.train, planted.test
    assert result.unreadable == [{"file": at(train, "tulips/broken.jpg"),
                                  "reason": "image data is corrupt or truncated (Truncated File Read)"}]  # fmt: skip
    assert sorted((p["file"], p["problem"]) for p in result.image_problems) == [
        (at(train, "daisy/blank.png"), "nearly blank"), (at(train, "daisy/tiny.png"), "tiny"),
        (at(train, "tulips/strip.png"), "extreme aspect ratio")]  # fmt: skip

    groups = {frozenset(d["files"]): d for d in result.duplicates}
    exact = frozenset({at(train, f"daisy/{photo('daisy', 3).name}"), at(train, "roses/copy-of-a-daisy.jpg")})
    resized = frozenset({at(train, f"tulips/{photo('tulips', 5).name}"), at(train, "tulips/smaller-copy.jpg")})
    cropped = frozenset(
        {at(train, f"sunflowers/{photo('sunflowers', 7).name}"), at(train, "sunflowers/cropped-copy.jpg")}
    )
    assert set(groups) == {exact, resized, cropped}  # the three planted, nothing else
    assert (
        groups[exact]["kind"] == "exact"
        and groups[exact]["cross_label"]
        and groups[exact]["labels"] == ["daisy", "roses"]
    )
    assert groups[resized]["kind"] == groups[cropped]["kind"] == "near"
    assert (
        not groups[resized]["cross_label"]
        and groups[cropped]["similarity"] >= result.method["near_duplicates"]["threshold"]
    )
    assert result.duplicates[0] is groups[exact]  # spanning labels comes first

    assert [(x["file"], x["against_file"], x["kind"]) for x in result.leaks] == [
        (at(train, f"dandelion/{photo('dandelion', 9).name}"), at(test, "dandelion/leaked.jpg"), "near")]  # fmt: skip

    suspects = {x["file"]: (rank, x) for rank, x in enumerate(result.label_issues)}
    for label, src in planted.moved.items():
        rank, issue = suspects[at(train, f"{label}/{src.name}")]
        assert issue["given"] == label and issue["suggested"] == src.parent.name and rank < 10
    confidences = [x["confidence"] for x in result.label_issues]
    assert confidences == sorted(confidences, reverse=True)
    assert result.labels == {"daisy": 44, "dandelion": 41, "roses": 40, "sunflowers": 40, "tulips": 43}
    assert result.imbalance == pytest.approx(44 / 40)  # "most / fewest"
    assert result.to_dict()["imbalance"] == 1.1


def test_second_audit_reads_cached_features_and_prints_json(planted, planted_audit, workspace, capsys, monkeypatch):
    monkeypatch.chdir(planted.root)
    code = main(["audit", "photos", "--against", "test", "--json", "--workspace", str(workspace)])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert {"labels", "unreadable", "duplicates", "leaks", "label_issues", "outliers"} <= set(report)
    assert report["method"]["features"] == {"extracted": 0, "cached": 212}
    assert (
        report["leaks"][0]["file"].startswith("photos/dandelion/")
        and report["leaks"][0]["against_file"] == "test/dandelion/leaked.jpg"
    )
    assert report["unreadable"] == [
        {"file": "photos/tulips/broken.jpg", "reason": planted_audit.unreadable[0]["reason"]}
    ]
    assert len(report["duplicates"]) == len(planted_audit.duplicates)
    assert [x["file"] for x in report["label_issues"]] == [
        os.path.relpath(x["file"], planted.root) for x in planted_audit.label_issues]  # fmt: skip


def test_bundled_flowers_have_no_duplicates_and_few_suspects(workspace, planted_audit):
    result = audit(FLOWERS, workspace=workspace, progress=False)
    assert result.method["features"]["extracted"] == 0  # all 200 were read by the planted audit
    assert result.duplicates == [] and result.leaks == [] and result.unreadable == [] and result.image_problems == []
    assert 0 < len(result.label_issues) <= SUSPECTS_ON_CLEAN_FLOWERS
    assert result.labels == {label: 40 for label in ("daisy", "dandelion", "roses", "sunflowers", "tulips")}


def test_gallery_shows_every_finding_with_thumbnails(planted, planted_audit, tmp_path):
    page = planted_audit.write_html(tmp_path / "gallery")
    html = page.read_text()
    for name in ("copy-of-a-daisy.jpg", "smaller-copy.jpg", "cropped-copy.jpg", "leaked.jpg", "blank.png",
                 "broken.jpg", planted.moved["daisy"].name, "spans labels: daisy / roses"):  # fmt: skip
        assert name in html
    sources = [part.split('"')[0] for part in html.split('<img src="')[1:]]
    assert len(sources) >= 12
    assert all((page.parent / src).is_file() for src in sources)
    assert "http://" not in html and "https://" not in html


def test_audit_of_a_missing_or_empty_folder_is_one_line_exit_2(tmp_path, capsys):
    assert main(["audit", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nowhere" in err
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    assert main(["audit", str(tmp_path / "empty"), "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "no images found" in err


def test_aligned_similarity_tells_copies_from_other_photos():
    pictures = [open_image(photo(label, 0)) for label in ("daisy", "roses", "tulips")]
    edits = [edit(pictures[0]) for edit in neardup.EDITS.values()]
    thumbs = np.stack([neardup.thumbnail(p) for p in pictures + edits])
    copies = np.array([(0, 3 + k) for k in range(len(edits))])
    others = np.array([(0, 1), (0, 2), (1, 2)])
    assert neardup.aligned_similarity(thumbs, copies).min() > 0.99
    assert neardup.aligned_similarity(thumbs, others).max() < 0.9
    flat = np.stack([np.full((neardup.THUMB, neardup.THUMB), 128, np.uint8), thumbs[0]])
    assert neardup.aligned_similarity(flat, np.array([(0, 1)]))[0] == 0.0  # no structure, no match


def test_threshold_follows_how_close_distinct_images_come():
    copies = np.full(200, 0.001)
    photos = neardup.choose_threshold(copies, np.full(100, 0.2))  # distinct photos are far apart
    slices = neardup.choose_threshold(copies, np.full(100, 0.008))  # MRI slices: neighbours at 0.992
    # docs/report-and-audit.md: "the looser of twice the first and 0.4 x the second, never looser than 0.98"
    assert photos.similarity == pytest.approx(0.98)
    assert slices.similarity == pytest.approx(1 - 0.4 * 0.008)  # 0.9968
    copies_decide = neardup.choose_threshold(np.full(200, 0.004), np.full(100, 0.015))
    assert copies_decide.similarity == pytest.approx(1 - 2 * 0.004)  # twice the copies' 0.004 beats 0.4 x 0.015
    with_copies = neardup.choose_threshold(copies, np.concatenate([np.full(40, 1e-4), np.full(100, 0.008)]))
    assert with_copies.similarity == pytest.approx(slices.similarity)  # copies do not drag it down


def test_a_photo_among_brain_scans_is_the_one_outlier(tmp_path, workspace):
    """docs/report-and-audit.md: outliers are "more than 4 robust deviations (MAD) below the folder's
    median" of mean cosine similarity to the 5 nearest. A daisy among the 8 bundled MRI slices scores
    0.870 against the slices' 0.31 to 0.41 (measured: 14.5 deviations; the slices within 1.8) on an
    AMD Zen 3 (AVX2, no AVX-512), and the same on a Zen 5 (AVX-512 bf16). Among the 200 flowers, coloured blocks, noise, text and a toaster
    came out at 3.0 deviations at most, so the folder here is one of a kind."""
    folder = tmp_path / "scans"
    shutil.copytree(Path(__file__).parent / "data" / "brain-mri", folder, ignore=shutil.ignore_patterns("*.md"))
    shutil.copy(photo("daisy", 0), folder / "glioma" / "daisy.jpg")
    result = audit(folder, workspace=workspace, progress=False)
    assert [Path(x["file"]).name for x in result.outliers] == ["daisy.jpg"]
    assert result.outliers[0]["score"] > 0.7 and result.outliers[0]["label"] == "glioma"
    assert result.labels == {"glioma": 3, "meningioma": 2, "notumor": 2, "pituitary": 2}
    assert result.imbalance == 1.5 and result.image_problems == [] and result.duplicates == []


def test_confident_learning_flags_the_confidently_misfiled():
    y = np.array([0, 0, 0, 1, 1, 1, 0])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.85, 0.15], [0.1, 0.9], [0.2, 0.8], [0.3, 0.7], [0.05, 0.95]])
    issues = label_model.confident_learning(probs, y)
    assert [(i.index, i.suggested) for i in issues] == [(6, 1)]
    assert issues[0].confidence == pytest.approx(0.9)


def test_training_warning_names_copies_across_labels_and_held_out(tmp_path):
    folder = small_flower_folder(tmp_path / "data", per_class=4, labels=("daisy", "roses"))
    images = load_images_from_directory(folder)
    assert training_warning(images[:6], images[6:]) is None
    shutil.copy(folder / "daisy" / photo("daisy", 0).name, folder / "roses" / "also-a-rose.jpg")
    reencode(photo("roses", 1), tmp_path / "held-out-copy.jpg", quality=60)
    reencode(photo("daisy", 2), tmp_path / "validation-copy.jpg", scale=0.9)
    line = training_warning(load_images_from_directory(folder), [ImageData(tmp_path / "held-out-copy.jpg", "roses")],
                            [ImageData(tmp_path / "validation-copy.jpg", "daisy")])  # fmt: skip
    assert line == ("the training folder has 1 group(s) of copies filed under different labels and 1 copies of "
                    "training images in the held-out images and 1 copies of training images in the validation "
                    "images; `imgclf audit FOLDER` shows them")  # fmt: skip


@pytest.mark.slow
def test_audit_and_report_pages_load_offline_in_chromium(planted_audit, small_model, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed (Debian package 'chromium')")
    sync_api = pytest.importorskip("playwright.sync_api")
    from imgclf import write_report

    audit_page = planted_audit.write_html(tmp_path / "audit")
    holdout = load_images_from_directory(small_flower_folder(tmp_path / "holdout", per_class=8))
    report_page = write_report(small_model, holdout, tmp_path / "report", name="flowers.imgclf")
    shots = os.environ.get("IMGCLF_INSIGHT_SCREENSHOTS")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])  # fmt: skip
        for name, page_file in (("audit", audit_page), ("report", report_page)):
            page = browser.new_page(viewport={"width": 1200, "height": 1500})
            outside: list[str] = []

            def only_files(route, outside=outside):
                if route.request.url.startswith("file://"):
                    return route.continue_()
                outside.append(route.request.url)
                return route.abort()

            page.route("**/*", only_files)
            page.goto(page_file.as_uri(), wait_until="load")
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => [e.getAttribute('src'), e.complete, e.naturalWidth])"
            )
            assert len(images) >= (12 if name == "audit" else 6)
            broken = [src for src, complete, width in images if not complete or width == 0]
            assert broken == [] and outside == []
            if shots:
                page.screenshot(path=str(Path(shots) / f"{name}-page.png"))
            page.close()
        browser.close()
