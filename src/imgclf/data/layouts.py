"""What a labelled input is, and its images: one loader for ``train``, ``evaluate``, ``report`` and ``audit``.

People bring labelled images in a few shapes, and each command should take them as they are
rather than ask for a copy in imgclf's own:

- a folder with one subfolder per label (``photos/cat/1.jpg``);
- a folder whose subfolders are ``train/``, ``val/`` (or ``valid/``, ``validation/``) and ``test/``,
  each with one subfolder per label: the ImageNet and Ultralytics classify layout, used as given;
- a manifest (``.csv``, ``.tsv``, ``.jsonl``, ``.parquet``; on disk or a URI) with a path column, a
  label column and optionally a ``split`` column (read by :mod:`imgclf.data.manifests`);
- a folder holding Hugging Face imagefolder's ``metadata.csv`` / ``metadata.jsonl``, which is a
  manifest (also inside each ``train/``, ``val/``, ``test/`` folder).

:func:`load_dataset` says which one it found in one line (``Dataset.layout``). A manifest's
images come out as the folder loader gives the same files: same names, same order, so a seeded
split (and so the trained model) is the same whichever way the images were listed.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from imgclf.data.images import (
    LABEL_SEPARATOR,
    ImageData,
    embedded_image,
    is_folder,
    is_skipped,
    load_images_from_directory,
    multilabel_image,
)
from imgclf.data.manifests import (
    SPLIT_COLUMN,
    columns_of,
    find_column,
    is_manifest,
    is_table,
    iter_rows,
    manifest_joiner,
    path_column,
)
from imgclf.data.parallel import ordered_map
from imgclf.data.uris import filesystem, is_uri, read_image_bytes
from imgclf.errors import DataError, ImageDecodeError, MissingDependencyError
from imgclf.options import LABEL_COLUMNS

#: The parts of a dataset, and how a ``split`` cell or a folder may spell each.
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "dev": "val", "test": "test", "testing": "test"}  # fmt: skip
_SPLITS_SAID = ", ".join(  # train (or training), val (or valid, validation, dev), test (or testing)
    f"{part} (or {', '.join(n for n, p in SPLIT_NAMES.items() if p == part and n != part)})" for part in ("train", "val", "test")
)
SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
#: Hugging Face imagefolder's manifest, found in a folder (the first of these there).
METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")


@dataclass
class Dataset:
    """Labelled images in up to three parts: ``train`` (everything when the input has no parts),
    ``validation`` and ``test`` (None when the input does not have them). ``layout``: one line
    saying what the input was found to be. ``duplicate_rows``: manifest rows that list a file
    already listed (each kept once: the first row)."""

    train: list[ImageData]
    validation: list[ImageData] | None = None
    test: list[ImageData] | None = None
    layout: str = ""
    duplicate_rows: list[dict] = field(default_factory=list)
    manifests: list[str] = field(default_factory=list)

    @property
    def parts(self) -> list[tuple[str, list[ImageData]]]:
        """(part, images) for each part it has, in train, val, test order."""
        named = [("train", self.train), ("val", self.validation), ("test", self.test)]
        return [(name, images) for name, images in named if images is not None]

    @property
    def images(self) -> list[ImageData]:
        """Every image of every part."""
        return [im for _, images in self.parts for im in images]


def load_dataset(source: str | Path, *, path_column: str | None = None, label_column: str | None = None,
                 label_map: str | Path | None = None, for_training: bool = True) -> Dataset:  # fmt: skip
    """The labelled images of ``source``: a folder (one subfolder per label, or ``train/``, ``val/``,
    ``test/`` folders of them), or a manifest. ``path_column`` and ``label_column`` name a
    manifest's columns (detected when None); ``label_map`` (a JSON object or list, or a text file
    with one name per line) names the labels a manifest gives as numbers. ``for_training=False``
    (what evaluation reads): a manifest whose split column has no ``train`` row is fine."""
    if not isinstance(source, (str, Path)):  # str() of a DataFrame or list made a multi-line "no such folder"
        raise DataError(f"{type(source).__name__} given where a folder or manifest path goes; give its path (a "
                        "DataFrame or list of images goes to fit, evaluate or predict_batch, or to_csv first)")  # fmt: skip
    text = str(source)
    names = {"path_column": path_column, "label_column": label_column, "label_map": label_map}
    if is_table(text):
        if not is_uri(text) and os.path.isdir(text):
            raise DataError(f"{text}: is a folder, not a manifest file")
        return _from_manifest(text, **names, what="manifest", for_training=for_training)
    if is_manifest(text) and not os.path.isdir(text):
        _path_column(text, None)  # a .txt list: one line saying what a labelled manifest needs
    if is_uri(text):
        raise DataError(f"{text}: labelled images from a URI come in a manifest (.csv, .tsv, .jsonl or .parquet "
                        "listing path and label); give its URI")  # fmt: skip
    root = Path(text)
    if root.is_dir():
        parts = _split_folders(root)
        if parts is not None:
            return _from_split_folders(root, parts, names)
        metadata = _metadata_file(root)
        if metadata is not None and not _labels_from_folders(metadata, names):
            return _from_manifest(str(metadata), **names, what="Hugging Face imagefolder metadata")
        _refuse_lone_parts(root)
    _refuse_manifest_options(text, names)
    said = f"{root}: one subfolder per label"
    if root.is_dir() and metadata is not None:
        said += f" ({metadata.name} has no label column: labels from the folders, as Hugging Face does)"
    return Dataset(load_images_from_directory(root), layout=said)


def _labels_from_folders(metadata: Path, names: dict) -> bool:
    """Whether a folder's Hugging Face metadata file without a label column (captions, say) beside
    label subfolders leaves the labels to the folders, as Hugging Face's imagefolder does."""
    if names["label_column"] is not None or find_column(str(metadata), columns_of(str(metadata)), None,
                                                        LABEL_COLUMNS, "label", "") is not None:  # fmt: skip
        return False
    with os.scandir(metadata.parent) as entries:
        return any(not is_skipped(e.name) and is_folder(e) for e in entries)


def _refuse_manifest_options(source: str, names: dict) -> None:
    given = [name for name, value in names.items() if value is not None]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise DataError(f"{flag} applies to manifests; {source} is a folder of label subfolders, so drop {flag}")


def _metadata_file(folder: Path) -> Path | None:
    found = [folder / name for name in METADATA_FILES if (folder / name).is_file()]
    if len(found) > 1:  # as Hugging Face's imagefolder: which one is meant is not for us to guess
        raise DataError(f"{folder}: holds {' and '.join(p.name for p in found)}; keep one metadata file")
    return found[0] if found else None


def _split_folders(root: Path) -> dict[str, Path] | None:
    """``train/``, ``val/`` and ``test/`` (as :data:`SPLIT_FOLDERS` spells them) when ``root`` holds
    ``train/`` and one of the others and nothing else; None when it is not such a folder."""
    try:
        with os.scandir(root) as entries:
            folders = sorted(e.name for e in entries if not is_skipped(e.name) and is_folder(e))
    except OSError:
        return None  # the folder loader says what is wrong with it
    found: dict[str, list[str]] = defaultdict(list)
    for name in folders:
        for part, spellings in SPLIT_FOLDERS.items():
            if name.lower() in spellings:
                found[part].append(name)
    if "train" not in found or not ({"val", "test"} & set(found)):
        return None
    others = [name for name in folders if not any(name in names for names in found.values())]
    if others:
        raise DataError(f"{root}: has train/ and {'val' if 'val' in found else 'test'}/ folders beside others "
                        f"({', '.join(others[:5])}); a split layout holds only train/, val/ (or valid/, validation/) "
                        "and test/, each with one subfolder per label: move the others out")  # fmt: skip
    for part, names in found.items():
        if len(names) > 1:
            raise DataError(f"{root}: has {' and '.join(n + '/' for n in names)}; keep one {part} folder")
    return {part: root / found[part][0] for part in SPLIT_FOLDERS if part in found}


def _refuse_lone_parts(root: Path) -> None:
    """One line when ``root`` holds part folders alone but not a split layout's (only ``train/``, or only
    ``val/`` and ``test/``): read as one subfolder per label, it would train labels called train or val."""
    try:
        with os.scandir(root) as entries:
            folders = sorted(e.name for e in entries if not is_skipped(e.name) and is_folder(e))
    except OSError:
        return  # the folder loader says what is wrong with it
    parts = {part for name in folders for part, spellings in SPLIT_FOLDERS.items() if name.lower() in spellings}
    if not folders or len(parts) != len(folders) or ("train" in parts and len(parts) > 1):
        return
    said = ", ".join(f"{name}/" for name in folders)
    fix = f"add val/ or test/ beside it, or give {root / folders[0]}" if "train" in parts else "add train/"
    raise DataError(f"{root}: holds only {said}; a split layout has train/ and val/ or test/, each with one "
                    f"subfolder per label: {fix}")  # fmt: skip


def _from_split_folders(root: Path, parts: dict[str, Path], names: dict) -> Dataset:
    loaded: dict[str, list[ImageData]] = {}
    duplicates: list[dict] = []
    manifests: list[str] = []
    for part, folder in parts.items():
        metadata = _metadata_file(folder)
        if metadata is not None and _labels_from_folders(metadata, names):
            metadata = None
        if metadata is None:
            _refuse_manifest_options(str(folder), names)
            loaded[part] = load_images_from_directory(folder)
            continue
        found = _from_manifest(str(metadata), **names, what="metadata")
        if found.validation is not None or found.test is not None:
            raise DataError(f"{metadata}: has a '{SPLIT_COLUMN}' column inside the {folder.name}/ folder; the "
                            "folder says which part its images are: drop the column")  # fmt: skip
        loaded[part] = found.train
        duplicates += found.duplicate_rows
        manifests += found.manifests
    said = ", ".join(f"{p.name}/" for p in parts.values())
    each = ("one subfolder per label" if not manifests else "its metadata file" if len(manifests) == len(parts)
            else "a metadata file or one subfolder per label")  # Hugging Face's, or the folder layout
    return Dataset(loaded["train"], loaded.get("val"), loaded.get("test"), layout=f"{root}: {said} folders, "
                   f"{each} in each", duplicate_rows=duplicates, manifests=manifests)  # fmt: skip


def _from_manifest(manifest: str, *, path_column: str | None, label_column: str | None,
                   label_map: str | Path | None, what: str, for_training: bool = True) -> Dataset:  # fmt: skip
    """A manifest's rows as a :class:`Dataset`: one part, or the parts its ``split`` column names."""
    columns = columns_of(manifest)
    paths = _path_column(manifest, path_column)
    labels = find_column(manifest, columns, label_column, LABEL_COLUMNS, "label", "--label-column")
    if labels is None:
        raise DataError(f"{manifest}: manifest has no label column (nor {', '.join(LABEL_COLUMNS[1:])}; its columns: "
                        f"{', '.join(columns[:10])}); name it 'label', or give --label-column")  # fmt: skip
    if labels == paths:
        raise DataError(f"{manifest}: the label column and the path column are both '{paths}'; name two "
                        "columns with --path-column and --label-column")  # fmt: skip
    split = find_column(manifest, columns, None, (SPLIT_COLUMN,), "split", "")
    mapping = read_label_map(label_map) if label_map is not None else None
    rows, duplicates = _rows(manifest, paths, labels, split, mapping)
    kept = _as_images(rows)
    by_part: dict[str, list[ImageData]] = defaultdict(list)
    for image, part in kept:
        by_part[part or "train"].append(image)
    held = "images" if any(isinstance(row[0], bytes) for row in rows) else "paths"  # Hugging Face's embedded images
    said = f"{manifest}: {what}, {held} in '{paths}', labels in '{labels}'"
    if split is not None:
        said += f", parts in '{split}' ({', '.join(f'{len(v)} {k}' for k, v in by_part.items())})"
    if duplicates:
        _warn_duplicates(manifest, duplicates)
    if split is None:
        return Dataset(by_part["train"], layout=said, duplicate_rows=duplicates, manifests=[manifest])
    if for_training and not by_part.get("train"):
        raise DataError(f"{manifest}: no row has '{split}' train; the training images are the train rows")
    return Dataset(by_part.get("train", []), by_part.get("val"), by_part.get("test"), layout=said,
                   duplicate_rows=duplicates, manifests=[manifest])  # fmt: skip


def _path_column(manifest: str, given: str | None) -> str:
    found = path_column(manifest, given)
    if found is None:  # a .txt list
        raise DataError(f"{manifest}: a .txt manifest lists paths alone; labelled images need a table with a path "
                        "and a label column (.csv, .tsv, .jsonl or .parquet)")  # fmt: skip
    return found


def _rows(manifest: str, paths: str, labels: str, split: str | None, mapping: dict[str, str] | None):
    """(path, label, part) per distinct file, in the folder loader's order, and the duplicate rows.
    A row whose cell holds the image itself (Hugging Face datasets' ``{"bytes", "path"}`` in
    Parquet, or bytes) gives (its bytes, label, part, name)."""
    join = manifest_joiner(manifest)
    first: dict[str, tuple] = {}
    duplicates: list[dict] = []
    schemes: set[str] = set()
    wanted = [paths, labels] + ([split] if split else [])
    for where, values in iter_rows(manifest, wanted):
        entry = _path_cell(values[0], where, paths)
        label = _label_cell(values[1], where, labels, mapping)
        part = _split_of(values[2], where, split) if split else None
        if isinstance(entry, tuple):  # the image itself: each row is its own image
            first[where] = (entry[0], where, label, part, entry[1])
            continue
        path = join(entry)
        if is_uri(path) and path.split("://", 1)[0] not in schemes:
            schemes.add(path.split("://", 1)[0])
            try:
                filesystem(path)  # a missing filesystem package: one line naming the row, before any image is read
            except MissingDependencyError as e:
                raise MissingDependencyError(f"{where}: {e}") from None
        key = path if is_uri(path) else os.path.abspath(path)  # a file listed relative and absolute is one file
        if key in first:
            was_where, was_label, was_part = first[key][1:4]
            duplicates.append({"file": path, "row": _row_name(where), "first_row": _row_name(was_where),
                               "labels": sorted({_joined(was_label), _joined(label)}),
                               "splits": sorted({was_part or "", part or ""} - {""})})  # fmt: skip
            continue
        first[key] = (path, where, label, part, path)
    if not first:
        raise DataError(f"{manifest}: manifest lists no images (a header and no rows)")
    rows = sorted(first.values(), key=lambda row: Path(row[4]))  # the folder loader's order, not the listing's
    multi = any(isinstance(row[2], tuple) for row in rows)  # one set of labels: every row is a set
    return [(source, _as_set(label) if multi else label, part, name) for source, _, label, part, name in rows], \
        duplicates


def _path_cell(cell: object, where: str, column: str) -> str | tuple[bytes, str]:
    """A manifest's path cell: the path as text, or (image bytes, name) when the cell holds the
    image itself, as Hugging Face datasets writes an ``Image`` column to Parquet."""
    embedded = embedded_image(cell)
    if embedded is not None:
        data, path = embedded
        if data is not None:
            return data, f"{where} ({path})" if path else where
        cell = path  # a path alone, as datasets writes images it did not embed
    if isinstance(cell, (bytes, bytearray)):
        try:
            text = bytes(cell).decode()
        except UnicodeDecodeError:
            text = None
        if text is None or "\x00" in text or len(cell) > 4096:  # not a path's text: the image's bytes
            return bytes(cell), where
        cell = text
    if cell is not None and not isinstance(cell, (str, int, float)):
        raise DataError(f"{where}: column '{column}' holds {type(cell).__name__} {str(cell)[:60]!r}, not an image "
                        "path; give the paths (or Hugging Face's {\"bytes\", \"path\"} images) in that column")  # fmt: skip
    entry = "" if cell is None else str(cell).strip()
    if not entry:
        raise DataError(f"{where}: no image path in column '{column}'; fill it in or remove the row")
    if "\x00" in entry:
        raise DataError(f"{where}: the image path in column '{column}' holds a NUL byte; fix or remove the row")
    return entry


def _joined(label: str | tuple[str, ...]) -> str:
    return label if isinstance(label, str) else LABEL_SEPARATOR.join(label)


def _as_set(label: str | tuple[str, ...]) -> tuple[str, ...]:
    return label if isinstance(label, tuple) else (label,)


def _label_cell(value: object, where: str, column: str, mapping: dict[str, str] | None) -> str | tuple[str, ...]:
    """A label cell: one label (text), or a set of labels (a tuple) when the cell is a list
    (Parquet, JSON Lines) or text holding the separator (``"cat;dog"``); a multi-label cell
    may be an empty list (an image with none of the labels)."""
    if isinstance(value, (list, tuple)):
        for v in value:
            if isinstance(v, str) and LABEL_SEPARATOR in v:
                raise DataError(f"{where}: label '{v.strip()}' in column '{column}' holds '{LABEL_SEPARATOR}', which "
                                "separates the labels of a set; give each label as its own list item")  # fmt: skip
        return tuple(dict.fromkeys(_label_text(v, where, column, mapping) for v in value))
    if isinstance(value, str) and LABEL_SEPARATOR in value:
        parts = [p for p in (p.strip() for p in value.split(LABEL_SEPARATOR)) if p]
        if not parts:
            raise DataError(f"{where}: '{value.strip()}' in column '{column}' names no label; give the image's "
                            "labels (\"a;b\"), or remove the row")  # fmt: skip
        return tuple(dict.fromkeys(_label_text(p, where, column, mapping) for p in parts))
    return _label_text(value, where, column, mapping)


def _row_name(where: str) -> str:
    """``line 7`` of ``data.csv line 7``."""
    return " ".join(where.rsplit(" ", 2)[-2:])


def _warn_duplicates(manifest: str, duplicates: list[dict]) -> None:
    clash = [d for d in duplicates if len(d["labels"]) > 1 or len(d["splits"]) > 1]
    e = clash[0] if clash else duplicates[0]
    detail = f"{e['row']} repeats {e['first_row']}, {e['file']}"
    if len(e["labels"]) > 1:
        detail += f", as {' and '.join(e['labels'])}"
    elif len(e["splits"]) > 1:
        detail += f", in {' and '.join(e['splits'])}"
    said = f"; {len(clash)} of them with another label or split" if clash else ""
    warnings.warn(f"{manifest}: ignored {len(duplicates)} row(s) listing a file already listed (e.g. {detail}){said}; "
                  "the first row of each file counts; `imgclf audit` lists them", stacklevel=4)  # fmt: skip


def _label_text(value: object, where: str, column: str, mapping: dict[str, str] | None) -> str:
    """A label cell as the label's name: text as it is, a whole number as its digits (or its name
    in ``mapping``)."""
    if value is None or (isinstance(value, float) and value != value) or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{where}: no label in column '{column}'; give every image a label, or remove the row")
    if isinstance(value, bool):  # JSON true/false: not a label's name nor its number
        raise DataError(f"{where}: the label in column '{column}' is {str(value).lower()}; a label is text or a "
                        "number, or a list of them (or \"a;b\") for several labels")  # fmt: skip
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a column of numbers with a gap reads as floats
    if isinstance(value, (str, int, float)):
        text = str(value).strip()
    else:
        raise DataError(f"{where}: the label in column '{column}' is {type(value).__name__} {value!r}; a label is "
                        "text or a number, or a list of them (or \"a;b\") for several labels")  # fmt: skip
    if mapping is None:
        return text
    if text not in mapping:
        known = ", ".join(list(mapping)[:10])
        raise DataError(f"{where}: label '{text}' is not in the --label-map (which has {known}); add it there")
    return mapping[text]


def _split_of(value: object, where: str, column: str) -> str:
    text = "" if value is None else str(value).strip().lower()
    if text not in SPLIT_NAMES:
        said = f"'{value}'" if text else "nothing"
        raise DataError(f"{where}: {said} in column '{column}'; each row's part is {_SPLITS_SAID}")
    return SPLIT_NAMES[text]


def _image(source: Path | bytes, label: str | tuple[str, ...], name: str) -> ImageData:
    return multilabel_image(source, label, name) if isinstance(label, tuple) else ImageData(source, label, name)


def _as_images(rows: list[tuple]) -> list[tuple[ImageData, str | None]]:
    """Local files as paths (read when used; a missing one is skipped then, as in a folder); URIs
    read now, in threads, since an image's content keys the feature cache; bytes as they are."""

    def load(row: tuple) -> tuple[ImageData | None, str | None]:
        path, label, part, name = row
        if isinstance(path, bytes):
            return _image(path, label, name), part
        if not is_uri(path):
            return _image(Path(path), label, path), part
        try:
            return _image(read_image_bytes(path), label, path), part
        except ImageDecodeError as e:
            warnings.warn(f"skipped {e}", stacklevel=2)
            return None, part

    return [(image, part) for image, part in ordered_map(load, rows) if image is not None]


def read_label_map(path: str | Path) -> dict[str, str]:
    """Label numbers to names: a JSON object (``{"0": "cat"}``), a JSON list or a text file with one
    name per line (line ``i`` names label ``i``, counting from 0, as ImageNet's and YOLO's lists do)."""
    where = f"--label-map {path}"
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if str(path).lower().endswith(".json"):
        try:
            value = json.loads(text)
        except ValueError as e:
            raise DataError(f"{where}: not JSON ({e})") from None
        if isinstance(value, list):
            value = dict(enumerate(value))
        if not isinstance(value, dict) or not all(isinstance(v, str) and v for v in value.values()):
            raise DataError(f'{where}: a label map gives each number a name, as text: a JSON object '
                            f'({{"0": "cat", "1": "dog"}}) or a list of names (["cat", "dog"])')  # fmt: skip
        return _distinct({str(k): v for k, v in value.items()}, where)
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names or not all(names):
        raise DataError(f"{where}: give one label name per line (line 1 names label 0), no blank lines")
    return _distinct({str(i): name for i, name in enumerate(names)}, where)


def _distinct(mapping: dict[str, str], where: str) -> dict[str, str]:
    """``mapping``, refused when it gives two numbers one name (which would merge two labels silently)."""
    seen: dict[str, str] = {}
    for number, name in mapping.items():
        if name in seen:
            raise DataError(f"{where}: names both {seen[name]} and {number} '{name}', which would merge two labels; "
                            "give each number its own name")  # fmt: skip
        seen[name] = number
    return mapping


def evaluation_images(dataset: Dataset) -> tuple[list[ImageData], str]:
    """What ``evaluate`` and ``report`` measure on: the test part when there is one, else every image;
    and a few words saying which."""
    if dataset.test is not None:
        return dataset.test, f"the {len(dataset.test)} test images"
    return dataset.images, f"all {len(dataset.images)} images"


def tagged(dataset: Dataset) -> tuple[list[ImageData], list[str]]:
    """Every image and the part it is in (what the audit checks for copies across parts)."""
    images: list[ImageData] = []
    parts: list[str] = []
    for part, members in dataset.parts:
        images += members
        parts += [part] * len(members)
    return images, parts
