"""What the Python API takes as images, beside paths and ``ImageData``: what a scikit-learn or
fastai user has at hand.

- a numpy array: one ``HxW``, ``HxWx1``, ``HxWx3`` or ``HxWx4`` uint8 image (channels last,
  RGB(A), as PIL, imageio and matplotlib give them), or an ``NxHxWxC`` batch of them;
- a list (or tuple, or pandas Series) of anything one image may be;
- a DataFrame (pandas, or another with ``columns`` and ``df[name]``) with a path column
  (:data:`PATH_COLUMNS`) and, for ``evaluate`` and ``fit``, a label column
  (:data:`LABEL_COLUMNS`);
- labels beside the images, as scikit-learn's ``fit(X, y)``: text, or whole numbers.

An array becomes a PIL image here, unchanged, so it goes through exactly the preprocessing a
PIL image does (no reduced-size JPEG decoding: docs/engines.md, "One model, one answer").
Anything else is one :class:`DataError` naming what is accepted.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imgclf.data.images import ImageData, embedded_image
from imgclf.errors import DataError
from imgclf.options import LABEL_COLUMNS, PATH_COLUMNS  # a DataFrame's columns are named as a manifest's

#: How an array image is shaped and typed, for messages.
ARRAY_SHAPES = "an HxW, HxWx1, HxWx3 or HxWx4 uint8 array (channels last)"
ACCEPTED = "a path, bytes, a binary file object, a PIL image, " + ARRAY_SHAPES + " or an ImageData"
MANY = ("a list of images, an NxHxWxC uint8 array, a folder, or a DataFrame with a path column "
        f"({', '.join(PATH_COLUMNS)})")  # fmt: skip
_CHANNELS = {1: "L", 3: "RGB", 4: "RGBA"}


def is_table(value: object) -> bool:
    """A DataFrame (pandas, Polars, ...): named columns, ``table[name]`` a column."""
    return (
        type(value).__name__ == "DataFrame" and hasattr(value, "columns") and not isinstance(value, (str, np.ndarray))
    )


def is_series(value: object) -> bool:
    """A pandas or Polars Series: one column of values."""
    return type(value).__name__ == "Series" and (hasattr(value, "tolist") or hasattr(value, "to_list"))


def _values(column: Any) -> list:
    return list(column.tolist() if hasattr(column, "tolist") else column.to_list())


def column(table: Any, names: Sequence[str]) -> Any:
    """The table's column named one of ``names`` (any case, first in ``names`` wins), or None."""
    columns = {str(c).lower(): c for c in table.columns}
    for name in names:
        if name in columns:
            return columns[name]
    return None


def _require_column(table: Any, names: Sequence[str], what: str, caller: str) -> Any:
    found = column(table, names)
    if found is None:
        have = [str(c) for c in table.columns]
        shown = ", ".join(have[:10]) + (", ..." if len(have) > 10 else "")
        raise DataError(f"{caller}: the DataFrame has no {what} column; name one {', '.join(names)} "
                        f"(its columns: {shown or 'none'})")  # fmt: skip
    return found


def array_image(array: np.ndarray, name: str) -> Image.Image:
    """A uint8 image array as the PIL image it is: the same pixels, grey, RGB or RGBA."""
    check_array(array, name)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(array))


def check_array(array: np.ndarray, name: str) -> None:
    """Raise one :class:`DataError` naming ``name`` unless ``array`` is one image."""
    shape = "x".join(map(str, array.shape)) or "()"
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in _CHANNELS):
        hint = ""
        if array.ndim == 3 and array.shape[0] in _CHANNELS:
            hint = "; channels first (CxHxW)? use a.transpose(1, 2, 0)"
        elif array.ndim == 4:
            hint = "; for a batch of images call predict_batch, or predict with the whole batch"
        raise DataError(f"{name}: an image array is {ARRAY_SHAPES}, got shape {shape}{hint}")
    if array.dtype != np.uint8:
        raise DataError(f"{name}: an image array must be uint8 (0 to 255), got {array.dtype}{_conversion(array)}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise DataError(f"{name}: the image array is empty (shape {shape})")


def _conversion(array: np.ndarray) -> str:
    """How to make ``array`` uint8, from the values it holds (a hint from its type alone sent 0-255
    floats through * 255 and wrapped 16-bit values)."""
    if array.size == 0 or not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        return ""
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        return "; it holds NaN or infinite values: replace them (np.nan_to_num) first"
    low, high = float(array.min()), float(array.max())
    if low < 0:
        return f"; its values run from {low:g} to {high:g}: rescale them to 0 to 255 first"
    if np.issubdtype(array.dtype, np.floating) and high <= 1:
        return f"; its values lie from {low:g} to {high:g}: use (a * 255).round().astype(np.uint8)"
    if high <= 255:
        return f"; its values lie from {low:g} to {high:g}: use " + (
            "a.round().astype(np.uint8)" if np.issubdtype(array.dtype, np.floating) else "a.astype(np.uint8)")
    if np.issubdtype(array.dtype, np.integer) and high <= 65535:
        return f"; its values reach {high:g} (16-bit): use (a >> 8).astype(np.uint8), or rescale by its range"
    return f"; its values reach {high:g}: rescale them to 0 to 255 first"


def is_item_array(value: object) -> bool:
    """A 1-D numpy array of paths or other objects (``df["path"].values``): a list, not pixels."""
    return isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "UO"


def is_many(value: object) -> bool:
    """Whether ``predict`` was given several images rather than one."""
    if isinstance(value, np.ndarray):
        return value.ndim == 4 or is_item_array(value)
    return isinstance(value, (list, tuple)) or is_table(value) or is_series(value)


def _is_one(value: object) -> bool:
    """One image that is not a collection: ``predict_batch`` refuses it with a hint."""
    return (
        isinstance(value, (bytes, bytearray, memoryview, Image.Image, ImageData))
        or hasattr(value, "read")
        or (isinstance(value, np.ndarray) and value.ndim != 4 and not is_item_array(value))
    )


def _from_cell(value: Any, where: str) -> Any:
    """One cell of a path column: a path, bytes, an array, or a Hugging Face ``{"bytes", "path"}`` image."""
    embedded = embedded_image(value)
    if embedded is not None:
        value = embedded[0] or embedded[1]
    if value is None or (isinstance(value, float) and value != value):
        raise DataError(f"{where}: no image (empty cell)")
    return value


def image_items(images: Any, caller: str = "predict_batch") -> list[tuple[Any, str | None]]:
    """(image, name or None) for each of several images: a list, tuple or Series of them, an
    ``NxHxWxC`` array or a DataFrame's path column. Arrays are checked here, named by their index."""
    if is_table(images):
        name = _require_column(images, PATH_COLUMNS, "path", caller)
        cells = _values(images[name])
        places = [f"{name} of row {i}" + (f" ({e[1]})" if (e := embedded_image(v)) and e[1] else "")
                  for i, v in enumerate(cells)]  # fmt: skip
        items = [_from_cell(v, place) for v, place in zip(cells, places)]
        return _named(items, places)
    if _is_one(images):
        if isinstance(images, np.ndarray) and images.ndim == 3 and images.shape[2] not in _CHANNELS:
            raise DataError(f"{caller} takes {MANY}; a 3-D array is one image (HxWxC): for N grey "
                            "images add a channel axis, a[..., None]")  # fmt: skip
        raise DataError(f"{caller} takes {MANY}; for one image call predict(image)")
    if isinstance(images, np.ndarray):
        items = list(images)
    elif is_series(images):
        items = _values(images)
    else:
        try:
            items = list(images)
        except TypeError:
            raise DataError(f"{caller} takes {MANY}, not {type(images).__name__}") from None
    return _named(items, [f"images[{i}]" for i in range(len(items))])


def _named(items: list, places: list[str]) -> list[tuple[Any, str | None]]:
    """Arrays checked, and they and bytes named by their place (they have no name of their own:
    a bad one was "<bytes>: not an image", which of many not said); the rest as they are."""
    named: list[tuple[Any, str | None]] = []
    for item, place in zip(items, places):
        if isinstance(item, np.ndarray):
            check_array(item, place)
            named.append((item, place))
        elif isinstance(item, (bytes, bytearray, memoryview)):
            named.append((item, place))
        elif item is None:
            raise DataError(f"{place}: None, not an image; give a path, bytes, a PIL image or an array")
        else:
            named.append((item, None))
    return named


def _label(value: Any, where: str) -> str:
    if isinstance(value, str):
        return str(value)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    raise DataError(f"{where}: {value!r} is not a label; labels are text (or whole numbers)")


def label_values(labels: Any, count: int, caller: str) -> list[str]:
    """``labels`` (a list, array or Series of text or whole numbers) as text, one per image."""
    if isinstance(labels, (str, bytes)) or not hasattr(labels, "__len__"):
        raise DataError(f"{caller}: labels must be a list (or array, or Series) with one label per image, "
                        f"not {type(labels).__name__}")  # fmt: skip
    values = _values(labels) if is_series(labels) else list(labels)
    if len(values) != count:
        raise DataError(f"{caller}: {count} image(s) but {len(values)} label(s); give one label per image")
    return [_label(v, f"labels[{i}]") for i, v in enumerate(values)]


def encoded_image_data(items: list[tuple[Any, str | None, str]], refusal: str) -> list[ImageData]:
    """:func:`labelled_items`' ``(image, name, label)`` as ``ImageData``: paths, and encoded bytes
    named by their place; a decoded picture is ``refusal`` and what it is (training and the
    report read files or bytes)."""
    found = []
    for i, (image, name, label) in enumerate(items):
        if isinstance(image, (str, Path)):
            found.append(ImageData(Path(image), label, name or str(image)))
        elif isinstance(image, (bytes, bytearray, memoryview)):
            found.append(ImageData(bytes(image), label, name or f"images[{i}]"))
        else:
            raise DataError(f"{refusal}; got {type(image).__name__}")
    return found


def _with_labels(caller: str) -> str:
    """How ``caller`` is given labels beside its images: a method's second argument, or (for an
    argument such as ``validation_set``, which is not a function) a folder of label subfolders."""
    return f"{caller}(images, labels)" if caller in ("fit", "evaluate", "fit_and_hold_out") else \
        f"{caller} as a folder of label subfolders"


def labelled_items(images: Any, labels: Any, caller: str) -> tuple[list[tuple[Any, str | None, str]], bool]:
    """(image, name, label) for each image ``evaluate`` or ``fit`` is given, and whether labels
    were taken from the paths' folder names (fastai's ``parent_label``).

    Labels come from ``labels`` (one per image), from ``ImageData.label``, from a DataFrame's
    label column, or, for paths given alone, from the name of the folder each file is in.
    """
    if is_table(images):
        items = image_items(images, caller)
        if labels is None:
            name = _require_column(images, LABEL_COLUMNS, "label", caller)
            labels = _values(images[name])
        return [(image, name, label) for (image, name), label in
                zip(items, label_values(labels, len(items), caller))], False  # fmt: skip
    if isinstance(images, (list, tuple)) and images and all(isinstance(im, ImageData) for im in images):
        if labels is not None:
            if any(im.label is not None for im in images):
                raise DataError(f"{caller}: the ImageData carry labels and labels were given too; leave one out")
            return [(im.source, im.name, label) for im, label in
                    zip(images, label_values(labels, len(images), caller))], False  # fmt: skip
        unlabelled = [im.name for im in images if im.label is None]
        if unlabelled:
            raise DataError(f"{unlabelled[0]}: image has no label; give {_with_labels(caller)} or ImageData "
                            "with labels")  # fmt: skip
        return [(im.source, im.name, im.label) for im in images], False
    items = image_items(images, caller)
    if labels is not None:
        return [(image, name, label) for (image, name), label in
                zip(items, label_values(labels, len(items), caller))], False  # fmt: skip
    found = []
    for image, _ in items:
        if isinstance(image, ImageData) and image.label is not None:
            found.append((image.source, image.name, image.label))
        elif isinstance(image, (str, Path)):
            found.append((image, str(image), Path(image).parent.name))
        else:
            raise DataError(f"{caller} needs a label for each image: {_with_labels(caller)}, ImageData with "
                            "labels, a folder with one subfolder per label, or a DataFrame with path and label "
                            f"columns ({', '.join(LABEL_COLUMNS)})")  # fmt: skip
    from_folders = any(isinstance(image, (str, Path)) for image, _ in items)
    return found, from_folders
