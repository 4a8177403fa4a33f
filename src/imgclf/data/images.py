"""Images in: folders whose subfolder names are labels, or bytes in memory.

Mirrors ML.NET's ``ImageData`` / ``InMemoryImageData``: an image is a source
(a path or bytes), an optional label and a name to report it by. Nothing here
decodes pixels; that happens lazily (``imgclf.data.imaging``) so that a folder of
100,000 photos costs a list of paths, not 100,000 decoded images.
"""

from __future__ import annotations

import hashlib
import numbers
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from imgclf.errors import DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})

#: Folders that tools leave beside photos (macOS zips, Synology, Windows, Python); never labels or images.
TOOL_FOLDERS = frozenset(
    {"__MACOSX", "__pycache__", "@eaDir", "$RECYCLE.BIN", "System Volume Information", "lost+found"}
)

_LAYOUT = "one subfolder per label, named after it, holding that label's images (photos/cat/1.jpg, photos/dog/2.jpg)"


#: How a multi-label image's labels are joined in ``ImageData.label`` (and split in a manifest cell).
LABEL_SEPARATOR = ";"


@dataclass(frozen=True)
class ImageData:
    """One image: a file path or raw bytes, with an optional label.

    A multi-label image (a manifest cell ``"a;b"``, or a list) has ``labels``, the set of its
    labels (possibly empty), and ``label`` is them joined by :data:`LABEL_SEPARATOR`: code that
    only reads ``label`` (splits, warnings, listings) still sees one string per image."""

    source: Path | bytes
    label: str | None = None
    name: str = ""
    labels: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.source, str):
            object.__setattr__(self, "source", Path(self.source))
        elif isinstance(self.source, (bytearray, memoryview)):
            object.__setattr__(self, "source", bytes(self.source))
        elif not isinstance(self.source, (Path, bytes)):
            raise DataError(f"ImageData: source is {type(self.source).__name__}; give a file path or the image's "
                            "encoded bytes")  # fmt: skip
        if isinstance(self.label, numbers.Integral) and not isinstance(self.label, bool):
            object.__setattr__(self, "label", str(int(self.label)))  # a label's number names it, as in fit(X, y)
        elif self.label is not None and not isinstance(self.label, str):
            raise DataError(f"ImageData: label is {type(self.label).__name__} {self.label!r}; a label is text (or a "
                            "whole number); several labels go in labels=(...)")  # fmt: skip
        if not self.name:
            object.__setattr__(self, "name", str(self.source) if isinstance(self.source, Path) else "<bytes>")

    def __repr__(self) -> str:
        if isinstance(self.source, Path):
            parts = [repr(str(self.source))]
            if self.name != str(self.source):
                parts.append(f"name={self.name!r}")
        else:
            parts = [f"<{len(self.source):,} bytes>", f"name={self.name!r}"]
        if self.labels is not None:
            parts.append(f"labels={self.labels!r}")
        elif self.label is not None:
            parts.append(f"label={self.label!r}")
        return f"ImageData({', '.join(parts)})"

    def read_bytes(self) -> bytes:
        """The encoded image, read from disk if needed."""
        if isinstance(self.source, Path):
            return self.source.read_bytes()
        return bytes(self.source)


def multilabel_image(source: Path | bytes, labels: Iterable[str], name: str = "") -> ImageData:
    """An image with a set of labels (multi-label training): ``label`` is them joined."""
    labels = tuple(dict.fromkeys(labels))
    return ImageData(source, LABEL_SEPARATOR.join(labels), name, labels)


def is_multilabel(images: Iterable[ImageData]) -> bool:
    """Whether any of ``images`` carries a set of labels: the dataset trains a multi-label model."""
    return any(im.labels is not None for im in images)


def label_set(image: ImageData) -> tuple[str, ...]:
    """An image's labels as a set: its ``labels``, else its one ``label`` split at the separator."""
    if image.labels is not None:
        return image.labels
    return split_labels(image.label)


def split_labels(label: str | None) -> tuple[str, ...]:
    """A label string as a set of labels: ``"a;b"`` is ``("a", "b")``, ``""`` none."""
    if not label:
        return ()
    return tuple(dict.fromkeys(p.strip() for p in label.split(LABEL_SEPARATOR) if p.strip()))


def embedded_image(cell: object) -> tuple[bytes | None, str | None] | None:
    """A Hugging Face ``datasets`` image cell (``{"bytes", "path"}``, as its ``Image`` feature is
    written to Parquet or ``to_pandas()``) as (its bytes, None where it was not embedded; its path,
    or None); None when ``cell`` is not one."""
    if not (isinstance(cell, dict) and ("bytes" in cell or "path" in cell)):
        return None
    data, path = cell.get("bytes"), cell.get("path")
    return (bytes(data) if isinstance(data, (bytes, bytearray)) and data else None), (str(path) if path else None)


def image_from_bytes(data: bytes, label: str | None = None, name: str = "<bytes>") -> ImageData:
    """An in-memory image (ML.NET's ``InMemoryImageData``)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DataError(f"image_from_bytes: data is {type(data).__name__}; give the encoded image's bytes (a path "
                        "goes to ImageData(path) or load_images_from_directory)")  # fmt: skip
    return ImageData(source=bytes(data), label=label, name=name)


def content_hash(data: bytes) -> str:
    """The key under which an image's features are cached."""
    return hashlib.sha256(data).hexdigest()


def is_skipped(name: str) -> bool:
    """Hidden files and folders (``.ipynb_checkpoints``, ``.DS_Store``, macOS's ``._photo.jpg``
    AppleDouble files) and tool folders (``__MACOSX``, ...) are never images or labels."""
    return name.startswith(".") or name in TOOL_FOLDERS


def iter_image_files(folder: str, _seen: set[tuple[int, int]] | None = None) -> Iterator[str]:
    """Image files at any depth below ``folder``, streamed in the order ``sorted(Path.rglob(...))``
    gives, holding one folder's listing at a time: the one walk that training, ``predict``, ``--out``
    and Ray find images by. Hidden files and folders and tool folders are skipped; links to folders
    are followed, each real folder once (no loops); a link that cannot be followed is kept, so that
    reading it says why."""
    seen = set() if _seen is None else _seen
    try:
        st = os.stat(folder)
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return
    if (st.st_dev, st.st_ino) in seen:
        return
    seen.add((st.st_dev, st.st_ino))
    for entry in entries:
        if is_skipped(entry.name):
            continue
        if is_folder(entry):
            yield from iter_image_files(entry.path, seen)
        elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and _is_file_or_link(entry):
            yield entry.path


def _is_file_or_link(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file() or entry.is_symlink()  # a broken link or a loop: an error where it is read
    except OSError:
        return True


def find_image_files(paths: Iterable[str | Path]) -> list[Path]:
    """Image files named directly, or found at any depth below folders (sorted per folder).

    Hidden files and folders and tool folders below a folder are skipped; a file
    named directly is always taken. Raises :class:`DataError` for a path that does not exist.
    """
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(sorted(map(Path, iter_image_files(str(p)))))
        elif p.is_file():
            found.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    return found


def load_images_from_directory(folder: str | Path, use_folder_name_as_label: bool = True) -> list[ImageData]:
    """Every image below ``folder``; its label is the top subfolder's name.

    Images may sit at any depth below a label folder. Hidden files and folders
    (``.ipynb_checkpoints``, ``._*`` AppleDouble files) and tool folders
    (``__MACOSX``) are skipped. Images directly in ``folder`` have no label: they
    are ignored with a warning when labels are wanted (and are an error if they
    are all there is). Label folders with no image inside are ignored too, named
    in one warning (a label with no images cannot be learnt or measured).
    """
    root = Path(folder)
    if root.is_file():
        raise DataError(f"{root}: is a file, neither a folder nor a manifest (.csv, .tsv, .jsonl or .parquet); "
                        f"give a folder with {_LAYOUT}, or a manifest")  # fmt: skip
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; give a folder with {_LAYOUT}")
    images, loose = [], []
    for f in find_image_files([root]):
        rel = f.relative_to(root)
        if not use_folder_name_as_label:
            images.append(ImageData(source=f, name=str(f)))
        elif len(rel.parts) < 2:
            loose.append(f)
        else:
            images.append(ImageData(source=f, label=rel.parts[0], name=str(f)))
    if loose and not images:
        raise DataError(f"{root}: its {len(loose)} image(s) lie directly in the folder, so they have no label; "
                        f"labels come from subfolders: make {_LAYOUT}")  # fmt: skip
    if not images:
        raise DataError(f"{root}: no images found; expected {_LAYOUT}, as JPEG, PNG, GIF, BMP, WebP or TIFF files")
    if loose:
        warnings.warn(f"ignored {len(loose)} image(s) directly in {root} (e.g. {loose[0].name}): only images inside "
                      "a label subfolder are used", stacklevel=2)  # fmt: skip
    if use_folder_name_as_label:
        labels = {im.label for im in images}
        empty = sorted(name for name in _label_folders(root) if name not in labels)
        if empty:
            shown = ", ".join(empty[:10]) + (f", ... ({len(empty)} in all)" if len(empty) > 10 else "")
            warnings.warn(f"ignored {len(empty)} empty label folder(s) in {root}: {shown} (no JPEG, PNG, GIF, BMP, "
                          "WebP or TIFF image inside, so no such label)", stacklevel=2)  # fmt: skip
    return images


def _label_folders(root: Path) -> list[str]:
    """The names of ``root``'s subfolders that would be labels (hidden and tool folders are not)."""
    try:
        with os.scandir(root) as entries:
            return [e.name for e in entries if not is_skipped(e.name) and is_folder(e)]
    except OSError:
        return []


def is_folder(entry: os.DirEntry) -> bool:
    """A folder, or a link to one (a link that cannot be followed is not)."""
    try:
        return entry.is_dir()  # follows links, as the walk does
    except OSError:
        return False


def label_names(images: Iterable[ImageData]) -> list[str]:
    """The distinct labels, sorted: the position of a label is its key (a multi-label image
    contributes each of its labels)."""
    names: set[str] = set()
    for im in images:
        if im.labels is not None:
            names.update(im.labels)
        elif im.label is not None:
            names.add(im.label)
    return sorted(names)


def check_labels(images: Sequence[ImageData], what: str = "training set", at_least: int = 2) -> list[str]:
    """The sorted labels of ``images``; raises if any image lacks one or there are fewer than
    ``at_least`` (1 where they add to a model's labels: ``train --from``)."""
    unlabeled = [im.name for im in images if im.label is None]
    if unlabeled:
        raise DataError(f"{unlabeled[0]}: image in the {what} has no label")
    labels = label_names(images)
    for label in labels:
        try:
            label.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"label {ascii(label)}: the folder name is not valid UTF-8 text; rename the folder "
                            "(labels are stored as text in the model file)") from None  # fmt: skip
    if len(labels) < at_least:
        found = f"only '{labels[0]}'" if labels else "none"
        raise DataError(
            f"{what}: need images of at least {at_least} label{'s' if at_least > 1 else ''} to train "
            f"a classifier, found {found}"
        )
    return labels
