"""Decoding images and turning them into network input, without torch.

This module is shared by training, the torch-free ONNX runtime and the web
server, so that every path sees exactly the same pixels. It only needs
Pillow and numpy.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from imgclf.errors import ImageDecodeError, ImageTooLargeError

ImageFile.LOAD_TRUNCATED_IMAGES = False

#: Refuse images with more pixels than this before decoding them (about 12x a
#: 12 MP phone photo). Guards servers against decompression bombs.
MAX_PIXELS = 150_000_000

Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # Pillow warns at this size; we turn its warning into an error

#: Formats we accept; anything else Pillow might open is refused.
SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "MPO"})

ImageSource = bytes | bytearray | memoryview | str | Path | Image.Image

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
    """

    input_size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def resize_to(self) -> int:
        return int(self.input_size / self.crop_pct)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(
            input_size=int(d["input_size"]),
            crop_pct=float(d["crop_pct"]),
            interpolation=str(d["interpolation"]),
            mean=tuple(float(x) for x in d["mean"]),
            std=tuple(float(x) for x in d["std"]),
        )

    def key(self) -> str:
        """A short string that changes whenever the produced pixels would."""
        return f"{self.input_size}-{self.crop_pct:g}-{self.interpolation}-" + "-".join(
            f"{x:g}" for x in self.mean + self.std
        )


def open_image(source: ImageSource, name: str = "<image>", *, draft_size: int | None = None) -> Image.Image:
    """Decode ``source`` into an RGB image, upright per its EXIF orientation.

    ``draft_size`` lets JPEG decoding shrink by a power of two (DCT scaling)
    as long as both sides stay at least that large: far cheaper for a 12 MP
    photo that will be resized to 256 pixels anyway.
    Raises :class:`ImageDecodeError` naming ``name`` for anything unreadable.
    """
    if isinstance(source, Image.Image):
        return _to_rgb(ImageOps.exif_transpose(source))
    if isinstance(source, (str, Path)):
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise ImageDecodeError(f"{name}: cannot read file ({e.strerror or e})") from None
    else:
        data = bytes(source)
    if not data:
        raise ImageDecodeError(f"{name}: file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in SUPPORTED_FORMATS:
                raise ImageDecodeError(
                    f"{name}: unsupported image format {img.format}; use JPEG, PNG, GIF, BMP, WebP or TIFF"
                )
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise ImageTooLargeError(
                    f"{name}: image is {width}x{height}, more pixels than the {MAX_PIXELS:,} allowed"
                )
            if draft_size and img.format in ("JPEG", "MPO"):
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            img = ImageOps.exif_transpose(img)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{name}: not an image Pillow can read (JPEG, PNG, GIF, BMP, WebP, TIFF)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLargeError(
            f"{name}: image has more pixels than the {MAX_PIXELS:,} allowed (decompression-bomb guard)"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageDecodeError(f"{name}: image data is corrupt or truncated ({e})") from None
    return _to_rgb(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, palette, 16-bit, CMYK and alpha images all become 8-bit RGB.

    Transparent pixels are composed onto white, as a person sees them.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / peak), 0, 255).astype(np.uint8), "L")
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


def resize_and_crop(img: Image.Image, prep: Preprocessing) -> Image.Image:
    """Resize the shorter side to ``prep.resize_to`` and centre-crop a square."""
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


def load_array(
    source: ImageSource, prep: Preprocessing, name: str = "<image>", *, fast_decode: bool = True
) -> np.ndarray:
    """Decode and preprocess one image: what the network sees for ``source``."""
    img = open_image(source, name, draft_size=prep.resize_to if fast_decode else None)
    return to_array(img, prep)
