"""Images in: folders whose subfolder names are labels, or bytes in memory.

Mirrors ML.NET's ``ImageData`` / ``InMemoryImageData``: an image is a source
(a path or bytes), an optional label and a name to report it by. Nothing here
decodes pixels; that happens lazily (``imgclf.data.imaging``) so that a folder of
100,000 photos costs a list of paths, not 100,000 decoded images.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from imgclf.errors import DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})


@dataclass(frozen=True)
class ImageData:
    """One image: a file path or raw bytes, with an optional label."""

    source: Path | bytes
    label: str | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", str(self.source) if isinstance(self.source, Path) else "<bytes>")

    def read_bytes(self) -> bytes:
        """The encoded image, read from disk if needed."""
        if isinstance(self.source, Path):
            return self.source.read_bytes()
        return bytes(self.source)


def image_from_bytes(data: bytes, label: str | None = None, name: str = "<bytes>") -> ImageData:
    """An in-memory image (ML.NET's ``InMemoryImageData``)."""
    return ImageData(source=bytes(data), label=label, name=name)


def content_hash(data: bytes) -> str:
    """The key under which an image's features are cached."""
    return hashlib.sha256(data).hexdigest()


def find_image_files(paths: Iterable[str | Path]) -> list[Path]:
    """Image files named directly or found at any depth below folders, sorted.

    Raises :class:`DataError` for a path that does not exist.
    """
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS))
        elif p.is_file():
            found.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    return found


def load_images_from_directory(folder: str | Path, use_folder_name_as_label: bool = True) -> list[ImageData]:
    """Every image below ``folder``; its label is the top subfolder's name.

    Images may sit at any depth below a class folder. Images directly in
    ``folder`` have no class and are ignored when labels are wanted.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; give a folder with one subfolder per label")
    images = []
    for f in find_image_files([root]):
        rel = f.relative_to(root)
        if use_folder_name_as_label:
            if len(rel.parts) < 2:
                continue
            images.append(ImageData(source=f, label=rel.parts[0], name=str(f)))
        else:
            images.append(ImageData(source=f, name=str(f)))
    if not images:
        raise DataError(f"{root}: no images found (expected subfolders named by label holding JPEG/PNG/... files)")
    return images


def label_names(images: Iterable[ImageData]) -> list[str]:
    """The distinct labels, sorted: the position of a label is its key."""
    return sorted({im.label for im in images if im.label is not None})


def check_labels(images: Sequence[ImageData], what: str = "training set") -> list[str]:
    """The sorted labels of ``images``; raises if any image lacks one or < 2 classes."""
    unlabeled = [im.name for im in images if im.label is None]
    if unlabeled:
        raise DataError(f"{unlabeled[0]}: image in the {what} has no label")
    labels = label_names(images)
    if len(labels) < 2:
        found = f"only '{labels[0]}'" if labels else "none"
        raise DataError(f"{what}: need images of at least 2 labels to train a classifier, found {found}")
    return labels
