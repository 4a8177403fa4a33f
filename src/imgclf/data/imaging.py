"""Decoding images and turning them into network input, without torch.

This module is shared by training, the torch-free ONNX runtime and the web
server, so that every path sees exactly the same pixels. It only needs
Pillow and numpy.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from imgclf.errors import ImageDecodeError, ImageTooLargeError
from imgclf.options import MAX_PIXELS as MAX_PIXELS

ImageFile.LOAD_TRUNCATED_IMAGES = False

#: MAX_PIXELS (imgclf.options, where serve's --max-pixels is bounded by it): refuse images with
#: more pixels than this before decoding them (about 12x a 12 MP phone photo). Guards servers
#: against decompression bombs.

#: Refuse an image whose resize before the centre crop would need more than this
#: (for a 224-pixel network an aspect ratio beyond about 1000:1; 16:1 always passes):
#: a tiny 1-pixel-high strip is otherwise resized to gigabytes outside ``serve``'s decode budget.
MAX_RESIZE_BYTES = 256 * 2**20

Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # Pillow warns at this size; we turn its warning into an error

#: Formats we accept; anything else Pillow might open is refused.
SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "MPO"})

ImageSource = bytes | bytearray | memoryview | str | Path | Image.Image

#: Decoders that hold their own copy of the pixels while filling the image.
_BUFFERING_DECODERS = frozenset({"TIFF", "WEBP"})
#: Extra bytes per source pixel to bring a mode to one ``Image.reduce`` averages correctly.
_REDUCE_CONVERSION_BYTES = {"1": 1, "P": 8, "PA": 8, "LA": 4, "RGBA": 4, "I;16": 1, "I;16B": 1, "I;16L": 1, "I": 1}
#: Bytes per working pixel to reach 8-bit RGB (alpha compositing: RGBA, white, result, RGB).
_RGB_CONVERSION_BYTES = 16
#: Grey modes wider than 8 bits, brought to 8 bits a strip of rows at a time.
_WIDE_GREY_MODES = frozenset({"I;16", "I;16B", "I;16L", "I"})
_STRIP_PIXELS = 1 << 20
_DECODE_OVERHEAD = 4 << 20
#: Shrink after decoding while the shorter side stays at least this many times
#: the resize target (Pillow's ``reducing_gap``: from 3 on, Pillow documents the
#: result as indistinguishable from resampling at full size).
REDUCING_GAP = 3

#: A hook that holds decode memory: ``with reserve(nbytes): ...`` waits until that
#: much may be used and raises :class:`ImageTooLargeError` if it never could.
Reserve = Callable[[int], AbstractContextManager]

#: Pillow resampling filters by the names timm configs use.
RESAMPLING = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class Preprocessing:
    """How a network wants its input: resize, centre crop, normalise.

    Images are resized (aspect kept) so the shorter side is
    ``round(input_size / crop_pct)``, centre-cropped to ``input_size``
    square, scaled to [0, 1] and normalised with ``mean`` and ``std``.

    ``frame="whole"`` resizes the whole image to ``input_size`` square instead (aspect not
    kept, nothing cropped): what multi-label models use, since the objects of a multi-label
    photo often sit at its edges, where a centre crop cuts them off. ``input_shape``
    ``(height, width)``, whole frame only, makes that a rectangle: a network ending in global
    average pooling takes any size, and images much wider (or taller) than square keep their
    aspect instead of being squeezed (:func:`input_shape_for`).
    """

    input_size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    frame: str = "crop"
    input_shape: tuple[int, int] | None = None

    @property
    def resize_to(self) -> int:
        """The shorter side after the resize (the crop); for the whole frame, the input's longer
        side, which is what a reduced-size decode must not go below on either axis."""
        return max(self.shape) if self.frame == "whole" else int(self.input_size / self.crop_pct)

    @property
    def height(self) -> int:
        return self.input_shape[0] if self.input_shape else self.input_size

    @property
    def width(self) -> int:
        return self.input_shape[1] if self.input_shape else self.input_size

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the network's input."""
        return self.height, self.width

    def to_dict(self) -> dict:
        """The fields as saved; ``frame`` only when it is not the centre crop and ``input_shape``
        only when it is not the square, so a file that crops reads as it always has (an older
        imgclf refuses a field it does not know)."""
        d = asdict(self)
        if self.frame == "crop":
            del d["frame"]
        if self.input_shape is None:
            del d["input_shape"]
        else:
            d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(
            input_size=int(d["input_size"]),
            crop_pct=float(d["crop_pct"]),
            interpolation=str(d["interpolation"]),
            mean=tuple(float(x) for x in d["mean"]),
            std=tuple(float(x) for x in d["std"]),
            frame=str(d.get("frame", "crop")),
            input_shape=tuple(int(x) for x in d["input_shape"]) if d.get("input_shape") else None,  # type: ignore[arg-type]
        )

    def key(self) -> str:
        """A short string that changes whenever the produced pixels would."""
        return f"{self.input_size}-{self.crop_pct:g}-{self.interpolation}-" + "-".join(
            f"{x:g}" for x in self.mean + self.std
        ) + ("-whole" if self.frame == "whole" else "") + (
            f"-{self.height}x{self.width}" if self.input_shape else ""
        )


def open_image(
    source: ImageSource,
    name: str = "<image>",
    *,
    draft_size: int | None = None,
    max_pixels: int = MAX_PIXELS,
    reserve: Reserve | None = None,
) -> Image.Image:
    """Decode ``source`` into an RGB image, upright per its EXIF orientation.

    ``draft_size`` says the image will be resized so its shorter side is that
    long: JPEG decoding then shrinks by a power of two (DCT scaling) and other
    formats are shrunk by a whole factor right after decoding (``Image.reduce``),
    as long as the shorter side stays well above it. A 12000x12000 PNG then
    costs its decoded size once, not several times over. ``max_pixels`` refuses
    larger images from their header, before decoding. ``reserve(nbytes)``, if
    given, is entered around the decoding with its estimated peak memory, so a
    server can bound what concurrent decodes may take.
    Raises :class:`ImageDecodeError` naming ``name`` for anything unreadable.
    """
    img = _open_lazily(source, name, draft_size, max_pixels)
    with _reserved(reserve, decode_bytes(img, draft_size), name), _decode_errors(name, max_pixels):
        return _decode(img, draft_size)


def load_array(
    source: ImageSource,
    prep: Preprocessing,
    name: str = "<image>",
    *,
    fast_decode: bool = True,
    max_pixels: int = MAX_PIXELS,
    reserve: Reserve | None = None,
) -> np.ndarray:
    """Decode and preprocess one image: what the network sees for ``source``.

    ``fast_decode`` decodes large images at reduced size (see :func:`open_image`);
    ``max_pixels`` and ``reserve`` are as there, the reservation also covering
    the resize.
    """
    draft_size = prep.resize_to if fast_decode else None
    img = _open_lazily(source, name, draft_size, max_pixels)
    resized = _resize_bytes(img.size, prep.resize_to)
    if resized > max(MAX_RESIZE_BYTES, _resize_bytes((1, 16), prep.resize_to)):  # 1x2000 -> 256x512000
        width, height = img.size
        raise ImageTooLargeError(f"{name}: image is {width}x{height}; resizing an image this narrow to fill the "
                                 f"network's input would take {resized // 2**20:,} MB")  # fmt: skip
    nbytes = decode_bytes(img, draft_size) + resized
    with _reserved(reserve, nbytes, name), _decode_errors(name, max_pixels):
        return to_array(_decode(img, draft_size), prep)


def oriented_size(source: ImageSource, name: str = "<image>", *, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of the whole image as :func:`open_image` turns it upright, read from
    its header and EXIF (no pixels decoded): the size an explanation's map is given at, which
    a reduced-size decode (``fast_decode``) does not tell."""
    img = _open_lazily(source, name, None, max_pixels)
    with _decode_errors(name, max_pixels):
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    width, height = img.size
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def decode_bytes(img: Image.Image, draft_size: int | None = None) -> int:
    """Estimated peak memory, in bytes, to decode an opened (not yet loaded) image
    into RGB: the decoded pixels at Pillow's bytes per pixel, what converting them
    takes, and the working copies after any reduction. Deliberately generous."""
    if not isinstance(img, ImageFile.ImageFile):  # already in memory: nothing more to decode
        return 0
    width, height = img.size
    pixels = width * height
    native = pixels * _bytes_per_pixel(img.mode)
    if img.format in _BUFFERING_DECODERS:
        native *= 2
    factor = _reduce_factor(img.size, draft_size)
    if factor > 1:
        converted = pixels * _REDUCE_CONVERSION_BYTES.get(img.mode, 0)
        working = -(-width // factor) * -(-height // factor)
    else:
        converted, working = 0, pixels
    strips = _STRIP_PIXELS * 24 if img.mode in _WIDE_GREY_MODES else 0
    return native + converted + working * _RGB_CONVERSION_BYTES + strips + _DECODE_OVERHEAD


def _bytes_per_pixel(mode: str) -> int:
    """Bytes per pixel Pillow stores for ``mode`` (RGB is padded to 4)."""
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else 4


def _resize_bytes(size: tuple[int, int], short: int) -> int:
    """The resized image before its centre crop (long for a very wide image)."""
    width, height = size
    return 4 * short * max(short, int(short * max(width, height) / max(1, min(width, height))))


def _reduce_factor(size: tuple[int, int], draft_size: int | None) -> int:
    if not draft_size:
        return 1
    return max(1, min(size) // (REDUCING_GAP * draft_size))


@contextmanager
def _reserved(reserve: Reserve | None, nbytes: int, name: str) -> Iterator[None]:
    """Hold ``reserve(nbytes)`` for the block; its refusal names the file."""
    if reserve is None:
        yield
        return
    with ExitStack() as held:
        try:
            held.enter_context(reserve(nbytes))
        except ImageTooLargeError as e:
            raise ImageTooLargeError(f"{name}: {e}") from None
        yield


@contextmanager
def _decode_errors(name: str, max_pixels: int = MAX_PIXELS) -> Iterator[None]:
    """Pillow's many exceptions as one :class:`ImageDecodeError` naming the file; an image
    over Pillow's own guard is refused naming ``max_pixels``, the limit the caller set."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{name}: not an image Pillow can read (JPEG, PNG, GIF, BMP, WebP, TIFF)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        counted = re.search(r"\((\d+) pixels\)", str(e))  # Pillow: "Image size (N pixels) exceeds limit of ..."
        has = f"image has {int(counted.group(1)):,} pixels, more" if counted else "image has more pixels"
        raise ImageTooLargeError(f"{name}: {has} than the {max_pixels:,} allowed") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageDecodeError(f"{name}: image data is corrupt or truncated ({e})") from None


def _open_lazily(source: ImageSource, name: str, draft_size: int | None, max_pixels: int) -> Image.Image:
    """Read the header only: format and size checked, JPEG draft mode set, no pixels yet."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (str, Path)):
        try:
            data = Path(source).read_bytes()
        except (OSError, ValueError) as e:  # ValueError: a path holding a NUL byte (from a manifest line)
            raise ImageDecodeError(f"{name}: cannot read file ({getattr(e, 'strerror', None) or e})") from None
    else:
        data = bytes(source)
    if not data:
        raise ImageDecodeError(f"{name}: file is empty (0 bytes)")
    with _decode_errors(name, max_pixels), warnings.catch_warnings():
        # Pillow warns from MAX_PIXELS on: the check below refuses at the caller's limit, naming the size
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
        if img.format not in SUPPORTED_FORMATS:
            raise ImageDecodeError(
                f"{name}: unsupported image format {img.format}; use JPEG, PNG, GIF, BMP, WebP or TIFF"
            )
        width, height = img.size
        if width * height > max_pixels:
            raise ImageTooLargeError(f"{name}: image is {width}x{height}, more pixels than the {max_pixels:,} allowed")
        if draft_size and img.format in ("JPEG", "MPO"):
            img.draft("RGB", (draft_size, draft_size))
    return img


#: How to turn each EXIF orientation upright (as ``ImageOps.exif_transpose``).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _decode(img: Image.Image, draft_size: int | None) -> Image.Image:
    """Load the pixels, shrink early, turn upright, make 8-bit RGB."""
    if not isinstance(img, ImageFile.ImageFile):  # an image handed over in memory
        return _to_rgb(ImageOps.exif_transpose(img))
    img.load()
    method = _ORIENTATION.get(img.getexif().get(ExifTags.Base.Orientation, 1))
    factor = _reduce_factor(img.size, draft_size)
    if factor > 1:
        img = _reduced(img, factor)
    if method is not None:
        img = img.transpose(method)
    return _to_rgb(img)


def _reduced(img: Image.Image, factor: int) -> Image.Image:
    """``img`` shrunk by a whole ``factor`` (box average), in a mode that averages
    correctly: wide grey to 8 bits first, palettes to colours, alpha premultiplied."""
    if img.mode in _WIDE_GREY_MODES:
        img = _wide_grey_to_8bit(img)
    elif img.mode == "1":
        img = img.convert("L")
    elif img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "PA":
        img = img.convert("RGBA")
    premultiplied = {"RGBA": "RGBa", "LA": "La"}.get(img.mode)
    if premultiplied:
        straight = img.mode
        return img.convert(premultiplied).reduce(factor).convert(straight)
    return img.reduce(factor)


def _wide_grey_to_8bit(img: Image.Image) -> Image.Image:
    """16- and 32-bit grey as 8-bit ``L``, a strip of rows at a time through a
    lookup table, so no full-size copy wider than 8 bits is made. 16-bit modes
    scale from 65535; 32-bit ones from 65535 if any value passes 255, else they
    are taken as 8-bit."""
    width, height = img.size
    rows = max(1, _STRIP_PIXELS // max(1, width))
    strips = [(0, top, width, min(top + rows, height)) for top in range(0, height, rows)]
    sixteen = img.mode.startswith("I;16") or any(np.asarray(img.crop(box)).max() > 255 for box in strips)
    top = 65535 if sixteen else 255
    table = _GREY_TABLE if sixteen else np.arange(256, dtype=np.uint8)
    out = np.empty((height, width), np.uint8)
    for box in strips:
        out[box[1] : box[3]] = table[np.clip(np.asarray(img.crop(box)), 0, top)]
    return Image.fromarray(out)


#: 16-bit grey value -> 8 bits, rounded down as ``v * 255 / 65535`` in float64 always was.
_GREY_TABLE = np.clip(np.arange(65536, dtype=np.float64) * (255.0 / 65535.0), 0, 255).astype(np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, palette, 16-bit, CMYK and alpha images all become 8-bit RGB.

    Transparent pixels are composed onto white, as a person sees them.
    """
    if img.mode == "RGB":
        return img
    if img.mode in _WIDE_GREY_MODES:
        img = _wide_grey_to_8bit(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize_shorter_side(img: Image.Image, prep: Preprocessing) -> Image.Image:
    """Resize (aspect kept) so the shorter side is ``prep.resize_to``."""
    width, height = img.size
    short = prep.resize_to
    if width <= height:
        new_size = (short, max(1, int(short * height / width)))
    else:
        new_size = (max(1, int(short * width / height)), short)
    return img if new_size == img.size else img.resize(new_size, RESAMPLING[prep.interpolation])


#: The whole frame keeps the images' aspect from 3:2 on (measured at 2:1, docs/benchmarks.md);
#: nearer square, the square; the long side at most twice the short (twice the pixels).
WIDE_ASPECT, MAX_ASPECT, STRIDE = 1.5, 2.0, 32


def input_shape_for(aspect: float, size: int) -> tuple[int, int] | None:
    """The (height, width) of a whole-frame input for images of ``aspect`` (width / height):
    None (the ``size`` square) below :data:`WIDE_ASPECT` either way, else ``size`` on the short
    side and the long side in steps of the networks' stride, at most :data:`MAX_ASPECT` times it."""
    if not math.isfinite(aspect) or aspect <= 0:
        return None
    wide = max(aspect, 1 / aspect)
    if wide < WIDE_ASPECT:
        return None
    long = min(math.floor(size * wide / STRIDE + 0.5) * STRIDE, int(size * MAX_ASPECT))
    return (size, long) if aspect > 1 else (long, size)


def resize_and_crop(img: Image.Image, prep: Preprocessing) -> Image.Image:
    """Resize the shorter side to ``prep.resize_to`` and centre-crop a square (or, for
    ``frame="whole"``, resize the whole image to the input's square or rectangle)."""
    if prep.frame == "whole":
        size = (prep.width, prep.height)
        return img if img.size == size else img.resize(size, RESAMPLING[prep.interpolation])
    img = resize_shorter_side(img, prep)
    size = prep.input_size
    left = int(round((img.size[0] - size) / 2.0))
    top = int(round((img.size[1] - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_array(img: Image.Image, prep: Preprocessing) -> np.ndarray:
    """An RGB image as a normalised float32 CHW array (the network's input)."""
    arr = np.asarray(resize_and_crop(img, prep), dtype=np.float32)
    mean = np.asarray(prep.mean, dtype=np.float32) * 255.0
    inv_std = 1.0 / (np.asarray(prep.std, dtype=np.float32) * 255.0)
    return ((arr - mean) * inv_std).transpose(2, 0, 1)
