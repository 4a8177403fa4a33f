"""Manifests and train/val/test folders, as train, evaluate, audit and scoring read them, on real photos.

One module fixture trains on the bundled flowers twice, from the folder and from a CSV manifest of
the same files, and one on a small train/valid/test tree; the other tests read those back or stop
before any network runs.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import random
import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch")

from imgclf.cli import main  # noqa: E402
from imgclf.data.layouts import load_dataset  # noqa: E402
from imgclf.errors import DataError  # noqa: E402
from imgclf.inference.model import load_model  # noqa: E402

from .conftest import FLOWERS  # noqa: E402


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def quiet_main(*argv) -> str:
    """Run ``imgclf`` in this process, expecting success; its stdout."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([str(a) for a in argv])
    assert code == 0, stderr.getvalue()
    return stdout.getvalue()


def photos(label: str, start: int = 0, stop: int | None = None) -> list[Path]:
    return sorted((FLOWERS / label).glob("*.jpg"))[start:stop]


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])
    return path


@pytest.fixture(scope="module")
def flowers_twice(tmp_path_factory, workspace):
    """The bundled flowers trained from the folder and from an equivalent CSV (rows shuffled,
    Hugging Face's column names, paths relative to the manifest), default head-only settings."""
    root = tmp_path_factory.mktemp("flowers-twice")
    manifest = root / "lists" / "flowers.csv"
    manifest.parent.mkdir()
    rows = [[os.path.relpath(p, manifest.parent), p.parent.name] for p in sorted(FLOWERS.rglob("*.jpg"))]
    random.Random(7).shuffle(rows)
    write_csv(manifest, ["file_name", "label"], rows)
    said = {}
    for name, source in (("folder", FLOWERS), ("manifest", manifest)):
        out = root / name
        out.mkdir()
        said[name] = (out, quiet_main("train", source, "--workspace", workspace, "--out", out / "m.imgclf",
                                      "--metrics-json", out / "metrics.json", "-q"))  # fmt: skip
    return said


def test_a_csv_manifest_trains_the_same_model_as_its_folder(flowers_twice):
    (folder, _), (listed, stdout) = flowers_twice["folder"], flowers_twice["manifest"]
    assert "Layout: " in stdout and "manifest, paths in 'file_name', labels in 'label'" in stdout
    assert "Found 200 images of 5 labels" in stdout
    a = json.loads((folder / "metrics.json").read_text())
    b = json.loads((listed / "metrics.json").read_text())
    assert a["micro_accuracy"] == b["micro_accuracy"] and a["confusion_matrix"] == b["confusion_matrix"]
    assert b["measured_on"] == {"part": "held-out", "images": 40, "train_images": 160, "validation_images": 0}
    first, second = load_model(folder / "m.imgclf"), load_model(listed / "m.imgclf")
    for key, value in first.head.state_dict().items():
        assert (value - second.head.state_dict()[key]).abs().max().item() < 1e-6, key


@pytest.fixture(scope="module")
def split_tree(tmp_path_factory):
    """train/, valid/ and test/ folders of three labels, distinct real photos in each."""
    root = tmp_path_factory.mktemp("tree") / "dataset"
    for label in ("daisy", "roses", "tulips"):
        for part, (start, stop) in {"train": (0, 6), "valid": (6, 8), "test": (8, 11)}.items():
            (root / part / label).mkdir(parents=True)
            for p in photos(label, start, stop):
                shutil.copy(p, root / part / label / p.name)
    return root


@pytest.fixture(scope="module")
def tree_trained(split_tree, tmp_path_factory, workspace):
    out = tmp_path_factory.mktemp("tree-model")
    return out, quiet_main("train", split_tree, "--epochs", "5", "--workspace", workspace, "--out", out / "m.imgclf",
                           "--metrics-json", out / "metrics.json", "-q")  # fmt: skip


def test_a_train_val_test_tree_reports_metrics_on_exactly_its_test_images(split_tree, tree_trained, workspace):
    out, stdout = tree_trained
    assert f"Layout: {split_tree}: train/, valid/, test/ folders, one subfolder per label in each" in stdout
    assert "Found 33 images (18 train, 6 val, 9 test) of 3 labels" in stdout
    assert "evaluating on the 9 test images" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["count"] == 9 and sum(map(sum, metrics["confusion_matrix"])) == 9
    assert metrics["measured_on"] == {"part": "test", "images": 9, "train_images": 18, "validation_images": 6}

    from imgclf import ImageClassificationTrainer

    model, held_out = ImageClassificationTrainer(epochs=2, workspace=workspace, progress=False).fit_and_hold_out(
        split_tree
    )
    assert sorted(im.name for im in held_out) == sorted(str(p) for p in (split_tree / "test").rglob("*.jpg"))
    assert model.info["training"]["validation_images"] == 6 and model.info["training"]["train_images"] == 18


@pytest.mark.parametrize("flag, value, part", [("--test-fraction", "0.5", "test"),
                                               ("--validation-fraction", "0.2", "validation")])
def test_a_fraction_for_a_part_the_tree_has_is_refused(flag, value, part, split_tree, tmp_path, capsys):
    """--test-fraction was ignored without a word where the tree has its own test images."""
    line = _one_line_exit_2(capsys, "train", split_tree, flag, value, "--out", tmp_path / "m.imgclf", "-q")
    assert f"{flag}: {split_tree} has its own {part} images (" in line and line.endswith(f"drop {flag}"), line


def test_evaluate_and_report_measure_a_trees_test_images(split_tree, tree_trained, tmp_path, capsys):
    model = tree_trained[0] / "m.imgclf"
    code, out, err = run(capsys, "evaluate", model, split_tree, "--json")
    assert code == 0, err
    assert json.loads(out)["count"] == 9 and "measuring on the 9 test images" in err


def test_a_manifests_split_column_and_unreadable_and_repeated_rows(tmp_path, capsys, workspace):
    """Missing and unreadable files are skipped and listed as in a folder; repeated rows are said."""
    (tmp_path / "notes.jpg").write_text("not a picture")
    rows = [[str(p), label, "train"] for label in ("daisy", "tulips") for p in photos(label, 0, 5)]
    rows += [[str(p), label, "test"] for label in ("daisy", "tulips") for p in photos(label, 5, 7)]
    rows += [["missing.jpg", "daisy", "train"], ["notes.jpg", "tulips", "train"]]
    rows += [[rows[0][0], "tulips", "train"], [rows[1][0], "daisy", "train"]]  # listed again, once with another label
    manifest = tmp_path / "data.tsv"
    manifest.write_text("\n".join("\t".join(r) for r in [["path", "class", "split"], *rows]) + "\n")
    code, out, err = run(capsys, "train", manifest, "--epochs", "3", "--workspace", workspace,
                         "--out", tmp_path / "m.imgclf", "--metrics-json", tmp_path / "m.json", "-q")  # fmt: skip
    assert code == 0, err
    assert "parts in 'split' (12 train, 4 test)" in out and "evaluating on the 4 test images" in out
    assert "Skipped 2 unreadable image(s):" in err
    assert str(tmp_path / "missing.jpg") in err and str(tmp_path / "notes.jpg") in err
    assert "ignored 2 row(s) listing a file already listed" in err and "1 of them with another label" in err
    assert json.loads((tmp_path / "m.json").read_text())["measured_on"]["images"] == 4


@pytest.mark.parametrize("part", ["test", "val"])
def test_a_part_with_no_readable_image_is_one_line_before_the_head_trains(part, tmp_path, capsys, workspace):
    """A test (or val) part whose every image is unreadable: refused, naming it, not trained on and dropped."""
    rows = [[str(p), label, "train"] for label in ("daisy", "tulips") for p in photos(label, 0, 5)]
    rows += [["missing.jpg", "daisy", part]]
    manifest = tmp_path / "data.csv"
    manifest.write_text("\n".join(",".join(r) for r in [["path", "label", "split"], *rows]) + "\n")
    line = _one_line_exit_2(capsys, "train", manifest, "--epochs", "3", "--workspace", workspace,
                            "--out", tmp_path / "m.imgclf", "-q")  # fmt: skip
    named = "test" if part == "test" else "validation"
    assert f"{named} set: none of its 1 image(s) is readable (e.g. {tmp_path / 'missing.jpg'}: " in line, line
    assert not (tmp_path / "m.imgclf").exists()


def test_a_label_with_no_readable_image_says_why_with_one_of_them(tmp_path, capsys, workspace):
    """Said only "label 'lily' has no readable image left; ... remove the folder": no file, no reason,
    and a manifest has no folder (paths resolved from the wrong folder fail every label this way)."""
    rows = [[str(p), label] for label in ("daisy", "tulips") for p in photos(label, 0, 5)]
    rows += [["x/a.jpg", "lily"], ["x/b.jpg", "lily"]]
    manifest = write_csv(tmp_path / "data.csv", ["path", "label"], rows)
    line = _one_line_exit_2(capsys, "train", manifest, "--epochs", "3", "--workspace", workspace,
                            "--out", tmp_path / "m.imgclf", "-q")  # fmt: skip
    assert f"label 'lily': none of its 2 image(s) is readable (e.g. {tmp_path / 'x' / 'a.jpg'}: " in line, line
    assert line.endswith("fix or replace them, or remove the label (its folder, or its rows)"), line


def _one_line_exit_2(capsys, *argv) -> str:
    code, out, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("imgclf: error: "), err
    return lines[0]


def test_a_file_listed_relative_and_absolute_is_one_file(tmp_path, monkeypatch):
    """A photo listed once as a relative path and once as an absolute one was two rows, in train
    and in test: a leak into the measured images, with no word about the repeated row."""
    for label in ("daisy", "tulips"):
        shutil.copytree(FLOWERS / label, tmp_path / label, ignore=lambda d, names: sorted(names)[4:])
    rows = [[f"{label}/{p.name}", label, "train"] for label in ("daisy", "tulips") for p in (tmp_path / label).iterdir()]
    rows += [[str(tmp_path / rows[0][0]), "daisy", "test"], [str(tmp_path / rows[-1][0]), "tulips", "test"]]
    rows += [[f"./tulips/{p.name}", "tulips", "test"] for p in sorted((tmp_path / "tulips").iterdir())[:1]]
    write_csv(tmp_path / "data.csv", ["path", "label", "split"], rows)
    monkeypatch.chdir(tmp_path)  # given as `imgclf train data.csv`: its relative rows stay relative
    with pytest.warns(UserWarning, match=r"ignored 3 row\(s\) listing a file already listed .* in test and train"):
        dataset = load_dataset("data.csv")
    assert len(dataset.train) == 8 and dataset.test is None


@pytest.mark.parametrize(
    "name, content, extra, said",
    [
        ("nolabel.csv", "path,kind\na.jpg,x\n", [], "no label column (nor labels, class, target; its columns: path, kind)"),
        ("nopath.csv", "label,x\ncat,1\n", [], "no 'path' column"),
        ("other.csv", "path,label\na.jpg,x\n", ["--label-column", "tag"], "no column 'tag' (--label-column)"),
        ("empty.csv", "", [], "manifest is empty"),
        ("header.csv", "path,label\n", [], "lists no images"),
        ("broken.jsonl", '{"path": "a.jpg", "label": "x"}\n{"path": \n', [], "broken.jsonl line 2: not JSON"),
        ("list.jsonl", '["a.jpg", "x"]\n', [], "line 1: a JSON list, not an object"),
        ("blank.csv", "path,label\na.jpg,x\nb.jpg,\n", [], "blank.csv line 3: no label in column 'label'"),
        ("nofile.csv", "path,label\n,x\n", [], "nofile.csv line 2: no image path in column 'path'"),
        ("split.csv", "path,label,split\na.jpg,x,holdout\n", [], "line 2: 'holdout' in column 'split'"),
        ("bad.parquet", "not parquet", [], "not a readable Parquet file"),
        ("latin.csv", b"path,label\n\xe9.jpg,x\n", [], "manifest is not UTF-8 text"),
        ("nums.csv", "path,label\na.jpg,7\n", ["--label-map", "{tmp}/names.txt"], "label '7' is not in the --label-map"),
        ("ok.csv", "path,label\na.jpg,0\n", ["--label-map", "{tmp}/none.txt"], "--label-map {tmp}/none.txt: no such file"),
        ("missing.csv", None, [], "missing.csv: no such manifest"),
        ("paths.txt", "a.jpg\n", [], "a .txt manifest lists paths alone; labelled images need a table"),
        ("nul.csv", "path,label\na\x00b.jpg,x\n", [], "nul.csv line 2: the image path in column 'path' holds a NUL byte"),
        ("twice.csv", "path,label\na.jpg,0\n", ["--label-map", "{tmp}/twice.txt"], "names both 0 and 1 'cat'"),
        ("semis.csv", "path,label\na.jpg,x\nb.jpg,;;\n", [], "semis.csv line 3: ';;' in column 'label' names no label"),
        ("twice.tsv", "path\tlabel\tlabel\na.jpg\tx\ty\n", [], "twice.tsv: its header names column 'label' twice"),
        ("bool.jsonl", '{"path": "a.jpg", "label": true}\n', [], "bool.jsonl line 1: the label in column 'label' is true"),
        ("same.csv", "path,label\na.jpg,x\n", ["--label-column", "path"], "label column and the path column are both 'path'"),
        # a quote left open took the following rows as one label: a label of 5 lines, trained on, exit 0
        ("open.csv", 'path,label\na.jpg,x\nb.jpg,"y\nc.jpg,z\nd.jpg,w\n', [], "open.csv line 3: column 'label' runs over 3 lines, to line 5 (a quote left open?)"),
        ("openpath.csv", 'path,label\n"a.jpg,x\nb.jpg,y\n', [], "openpath.csv line 2: column 'path' runs over 2 lines"),
        ("semi.jsonl", '{"path": "a.jpg", "label": ["a;b", "c"]}\n', [], "semi.jsonl line 1: label 'a;b' in column 'label' holds ';'"),
    ],
)  # fmt: skip
def test_a_manifest_that_cannot_be_used_is_one_line_and_exit_2(name, content, extra, said, tmp_path, capsys):
    (tmp_path / "names.txt").write_text("cat\ndog\n")
    (tmp_path / "twice.txt").write_text("cat\ncat\n")
    manifest = tmp_path / name
    if isinstance(content, bytes):
        manifest.write_bytes(content)
    elif content is not None:
        manifest.write_text(content)
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    line = _one_line_exit_2(capsys, "train", manifest, *extra, "--out", tmp_path / "m.imgclf", "-q")
    assert said.replace("{tmp}", str(tmp_path)) in line, line


def test_scoring_refuses_a_quote_left_open_and_predict_without_out_names_the_manifest(small_model_file, tmp_path,
                                                                                      capsys):  # fmt: skip
    """Scoring read only the path column, so the rows a quote left open swallowed were silently
    not scored (13 of 19); plain predict read a manifest as an image."""
    rows = [f"{p},{p.parent.name}" for p in photos("daisy", 0, 5)]
    rows[2] = rows[2].replace(",", ',"')  # line 4 opens a quote it never closes
    manifest = tmp_path / "open.csv"
    manifest.write_text("path,label\n" + "\n".join(rows) + "\n")
    line = _one_line_exit_2(capsys, "predict", small_model_file, manifest, "--out", tmp_path / "r.parquet", "-q")
    assert "open.csv line 4: column 'label' runs over 3 lines, to line 6" in line, line
    line = _one_line_exit_2(capsys, "predict", small_model_file, manifest)
    assert f"{manifest}: a manifest; predict reads manifests into a results file: add --out" in line, line


def test_manifest_options_on_a_folder_are_refused(tmp_path, capsys):
    line = _one_line_exit_2(capsys, "train", FLOWERS, "--path-column", "file", "--out", tmp_path / "m.imgclf")
    assert "--path-column applies to manifests" in line


def test_a_uri_whose_filesystem_package_is_missing_is_one_line(tmp_path, capsys):
    fsspec = pytest.importorskip("fsspec")
    from fsspec.registry import known_implementations

    missing = next((s for s in ("gs", "az", "oci", "webdav") if s in known_implementations
                    and not _importable(known_implementations[s]["class"].split(".")[0])), None)  # fmt: skip
    if missing is None:
        pytest.skip("every candidate filesystem package is installed")
    line = _one_line_exit_2(capsys, "train", f"{missing}://bucket/data.csv", "--out", tmp_path / "m.imgclf")
    assert f"{missing}:// needs the" in line
    fs = fsspec.filesystem("memory")  # a manifest that can be read, listing an image there
    fs.pipe("/needs-package/data.csv", f"path,label\n{missing}://bucket/a.jpg,x\nb.jpg,y\n".encode())
    line = _one_line_exit_2(capsys, "train", "memory://needs-package/data.csv", "--out", tmp_path / "m.imgclf")
    assert f"memory://needs-package/data.csv line 2: {missing}://bucket/a.jpg: {missing}:// needs the" in line, line


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_manifests_behind_uris_and_in_every_format_read_the_same(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    chosen = [(p, label) for label in ("daisy", "tulips") for p in photos(label, 0, 2)]
    fs = fsspec.filesystem("memory")
    for p, label in chosen:
        fs.pipe(f"/remote/{label}/{p.name}", p.read_bytes())
    lines = [json.dumps({"file_name": f"{label}/{p.name}", "label": label}) for p, label in chosen]
    fs.pipe("/remote/metadata.jsonl", ("\n".join([*lines, json.dumps({"file_name": "gone.jpg", "label": "daisy"})])
                                        + "\n").encode())  # fmt: skip
    with pytest.warns(UserWarning, match="skipped memory://remote/gone.jpg: cannot read file"):
        remote = load_dataset("memory://remote/metadata.jsonl")
    assert [(im.name, im.label) for im in remote.train] == [
        (f"memory://remote/{label}/{p.name}", label) for p, label in chosen
    ]
    assert remote.train[0].read_bytes() == chosen[0][0].read_bytes()

    # integer labels, named by a --label-map or left as numbers; Parquet and TSV
    pq.write_table(pa.table({"image": [str(p) for p, _ in chosen], "target": [0, 0, 1, 1]}), tmp_path / "n.parquet")
    (tmp_path / "names.json").write_text('["daisy", "tulips"]')
    named = load_dataset(tmp_path / "n.parquet", label_map=tmp_path / "names.json")
    assert [im.label for im in named.train] == ["daisy", "daisy", "tulips", "tulips"]
    assert [im.label for im in load_dataset(tmp_path / "n.parquet").train] == ["0", "0", "1", "1"]
    (tmp_path / "t.tsv").write_text("img\tcat\n" + "".join(f"{p}\t{label}\n" for p, label in chosen))
    tsv = load_dataset(tmp_path / "t.tsv", path_column="img", label_column="cat")
    assert [im.name for im in tsv.train] == [im.name for im in named.train]


def test_a_parquet_of_hugging_face_images_trains_evaluates_and_audits(tmp_path, workspace, capsys):
    """datasets' Parquet holds each image as {"bytes", "path"}: train said 'no readable image left',
    audit printed each row's bytes as its file name and counted 0 images, with exit 0."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"image": {"bytes": p.read_bytes(), "path": p.name}, "label": label}
            for label in ("daisy", "roses", "tulips") for p in photos(label, 0, 6)]  # fmt: skip
    rows[0]["image"] = {"bytes": None, "path": str(photos("daisy", 6, 7)[0])}  # a path alone, not embedded
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "hf.parquet")
    code, out, err = run(capsys, "train", tmp_path / "hf.parquet", "--epochs", "3", "--workspace", workspace,
                         "--out", tmp_path / "m.imgclf", "-q")  # fmt: skip
    assert code == 0, err
    assert "Found 18 images of 3 labels" in out and "images in 'image', labels in 'label'" in out
    assert load_model(tmp_path / "m.imgclf").labels == ["daisy", "roses", "tulips"]
    code, out, err = run(capsys, "audit", tmp_path / "hf.parquet")
    assert code == 0 and "Audited 18 readable images of 3 labels" in out and len(out) < 5000, out
    line = _one_line_exit_2(capsys, "predict", tmp_path / "m.imgclf", tmp_path / "hf.parquet", "--out",
                            tmp_path / "r.parquet", "-q")  # fmt: skip
    assert "hf.parquet row 2: column 'image' holds the images themselves, not paths" in line, line


def test_hugging_face_imagefolder_metadata_works_as_is(tmp_path):
    root = tmp_path / "hf"
    for part, (start, stop) in {"train": (0, 3), "test": (3, 4)}.items():
        (root / part).mkdir(parents=True)
        rows = []
        for label in ("daisy", "roses"):
            for p in photos(label, start, stop):
                shutil.copy(p, root / part / p.name)
                rows.append([p.name, label, "extra text"])
        write_csv(root / part / "metadata.csv", ["file_name", "label", "caption"], rows)
    tree = load_dataset(root)
    assert len(tree.train) == 6 and len(tree.test) == 2 and tree.validation is None
    assert all(Path(im.name).parent == root / "train" for im in tree.train)
    assert tree.layout == f"{root}: train/, test/ folders, its metadata file in each"  # said "one subfolder per label"
    (root / "test" / "metadata.jsonl").write_text("")  # which of two is meant is not guessed (it took the CSV)
    with pytest.raises(DataError, match=r"test: holds metadata.csv and metadata.jsonl; keep one metadata file"):
        load_dataset(root)
    (root / "test" / "metadata.jsonl").unlink()
    (root / "test" / "metadata.csv").unlink()
    shutil.rmtree(root / "test")
    single = load_dataset(root / "train")
    assert "Hugging Face imagefolder metadata" in single.layout and len(single.train) == 6


def test_a_captions_metadata_file_beside_label_folders_leaves_the_labels_to_the_folders(tmp_path):
    """As Hugging Face's imagefolder: a metadata.csv of captions was refused ('no label column')."""
    for label in ("daisy", "roses"):
        (tmp_path / label).mkdir()
        for p in photos(label, 0, 3):
            shutil.copy(p, tmp_path / label / p.name)
    write_csv(tmp_path / "metadata.csv", ["file_name", "text"],
              [[f"{p.parent.name}/{p.name}", "a photo"] for p in sorted(tmp_path.glob("*/*.jpg"))])  # fmt: skip
    found = load_dataset(tmp_path)
    assert sorted({im.label for im in found.train}) == ["daisy", "roses"] and len(found.train) == 6
    assert found.layout.endswith("(metadata.csv has no label column: labels from the folders, as Hugging Face does)")


def test_a_split_tree_with_other_folders_is_refused(tmp_path):
    for name in ("train/cat", "val/cat", "extras"):
        (tmp_path / name).mkdir(parents=True)
    with pytest.raises(DataError, match="beside others \\(extras\\)"):
        load_dataset(tmp_path)


@pytest.mark.parametrize("folders, said", [(("train",), "holds only train/; "), (("val", "test"), "holds only test/, val/; ")])
def test_a_tree_of_part_folders_without_train_and_val_or_test_is_refused(folders, said, tmp_path):
    """Not read as a folder of labels called train (or val and test): a model of those would be nonsense."""
    for name in folders:
        (tmp_path / name / "cat").mkdir(parents=True)
        (tmp_path / name / "dog").mkdir(parents=True)
    with pytest.raises(DataError, match=said):
        load_dataset(tmp_path)
    (tmp_path / "metadata.csv").write_text(f"file_name,label\n{folders[0]}/cat/a.jpg,cat\n")  # imagefolder's: as is
    assert load_dataset(tmp_path).layout.endswith("Hugging Face imagefolder metadata, paths in 'file_name', labels in 'label'")


def test_scoring_reads_the_same_manifests(tmp_path):
    from imgclf.batch.sources import classify_inputs, iter_image_paths

    chosen = photos("daisy", 0, 3)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"file_name": p.name}) + "\n" for p in chosen))
    (tmp_path / "b.tsv").write_text("label\timage\n" + "".join(f"x\t{p}\n" for p in chosen))
    found = list(iter_image_paths(classify_inputs([tmp_path / "a.jsonl", tmp_path / "b.tsv"])))
    assert found == [str(tmp_path / p.name) for p in chosen] + [str(p) for p in chosen]


def test_a_scored_manifest_line_holding_a_nul_byte_is_an_unreadable_image_not_a_traceback(tmp_path):
    from imgclf.data.imaging import Preprocessing, load_array
    from imgclf.errors import ImageDecodeError

    with pytest.raises(ImageDecodeError, match="^line 2: cannot read file \\(embedded null byte\\)$"):
        load_array(str(tmp_path / "a\x00b.jpg"), Preprocessing(224, 0.875, "bicubic", (0.5,) * 3, (0.5,) * 3), "line 2")


def test_a_manifest_audit_lists_repeated_rows_and_copies_across_parts(tmp_path):
    pytest.importorskip("imagehash")
    from imgclf import audit

    rows = [[str(p), label, "train"] for label in ("daisy", "tulips") for p in photos(label, 0, 4)]
    rows += [[str(p), label, "test"] for label in ("daisy", "tulips") for p in photos(label, 4, 6)]
    copy = tmp_path / "copy.jpg"
    shutil.copy(photos("daisy", 0, 1)[0], copy)  # the same photo again, under test
    rows += [[str(copy), "daisy", "test"], [rows[0][0], "daisy", "test"], [rows[1][0], "tulips", "train"]]
    manifest = write_csv(tmp_path / "data.csv", ["path", "label", "split"], rows)
    with pytest.warns(UserWarning, match="ignored 2 row"):
        result = audit(manifest, workspace=tmp_path / "ws", progress=False)
    repeated = {(d["row"], d["first_row"]): d for d in result.duplicate_rows}
    assert repeated[("line 15", "line 2")]["splits"] == ["test", "train"]
    assert repeated[("line 16", "line 3")]["labels"] == ["daisy", "tulips"]
    assert any(leak["between"] == "train/test parts" and leak["against_file"] == str(copy) for leak in result.leaks)
    summary = result.summary()
    assert "rows listing a file twice: 2, 2 WITH ANOTHER LABEL OR PART" in summary
    assert "leaks into the train/test parts: " in summary
    assert result.to_dict()["duplicate_rows"] == result.duplicate_rows
