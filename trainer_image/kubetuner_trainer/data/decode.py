"""Open and decode image files: one place that knows every Pillow mode.

``open_image`` parses only the header (discovery reads sizes with it); ``decode_rgb`` decodes the
pixels and turns any mode into 8-bit RGB, or raises ``UnreadableImage`` saying why the file is left out.
Discovery, ``kubetuner data inspect`` and the latent cache all go through these two functions, so a file
is usable for all of them or for none.

How modes become 8-bit RGB (Pillow's own ``convert("RGB")`` clamps wide integer modes to 0..255, which
turns a 16-bit photo nearly white):

- ``I;16``, ``I;16L``, ``I;16B``, ``I;16N`` (16-bit grey): value / 257, rounded (65535 -> 255).
- ``I`` (32-bit integer grey; older Pillow opens 16-bit PNGs this way): read as 16-bit when every value
  lies in 0..65535, otherwise left out (the bit depth is unknown).
- ``F`` (32-bit float grey): read as 0.0..1.0 when every value lies in that range, otherwise left out.
- Alpha (``RGBA``, ``LA``, ``PA``, ``La``, ``RGBa``, ``P`` with a transparency entry): composited over white,
  so transparent areas are white rather than whatever colour the encoder left under them.
- 16-bit RGB/RGBA PNGs: Pillow opens them as 8-bit ``RGB``/``RGBA`` keeping the high byte of each sample
  (a correct 16 -> 8 bit scaling), so they need nothing more.
- ``CMYK``: Pillow's conversion (Adobe-inverted JPEGs are handled when the file is opened).
- ``LAB``: left out (convert the file to RGB first).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

EXIF_ORIENTATION = 0x0112
WIDE_GREY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
ALPHA_BACKGROUND = (255, 255, 255)
UNSUPPORTED_MODES = {"LAB": "CIELAB colour is not supported; convert the file to RGB"}
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class UnreadableImage(ValueError):
    """The file is not a usable image (the message says why)."""


def open_image(data: bytes) -> Image.Image:
    """Open ``data`` lazily (header only); ``UnreadableImage`` for unknown, damaged or unsupported files."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UnreadableImage("not a readable image (unknown or damaged format)") from None
    except _DECODE_ERRORS as error:
        raise UnreadableImage(f"not a readable image ({error.__class__.__name__}: {error})") from None
    if image.mode in UNSUPPORTED_MODES:
        raise UnreadableImage(f"pixel mode {image.mode}: {UNSUPPORTED_MODES[image.mode]}")
    return image


def decode_rgb(data: bytes, *, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """The pixels of ``data`` as an 8-bit RGB image, EXIF orientation applied.

    ``draft_size`` (width, height, upright) lets JPEG decode at a reduced scale when the image is much
    larger than needed. Raises ``UnreadableImage`` when the file cannot be decoded or its
    pixel values cannot be mapped to 8 bits (the message says which).
    """
    image = open_image(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if draft_size is not None and image.format == "JPEG":
                stored = draft_size if exif_orientation(image) < 5 else (draft_size[1], draft_size[0])
                image.draft("RGB", stored)
            image.load()
            image = ImageOps.exif_transpose(image)
    except _DECODE_ERRORS as error:
        raise UnreadableImage(f"cannot decode image ({error.__class__.__name__}: {error})") from None
    return to_rgb8(image)


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1..8; 5-8 swap width and height); 1 when absent or broken."""
    try:
        value = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # broken EXIF must not make the image unusable
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def to_rgb8(image: Image.Image) -> Image.Image:
    """``image`` (any mode, pixels loaded) as 8-bit RGB; ``UnreadableImage`` when its values are out of range."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in WIDE_GREY_MODES:
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise UnreadableImage(f"32-bit integer pixels range {values.min()}..{values.max()}, beyond 16 bits; "
                                  "save the image with 8 or 16 bits per channel")
        return _grey(np.rint(values / 257.0))
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.size and (not np.isfinite(values).all() or values.min() < 0.0 or values.max() > 1.0):
            raise UnreadableImage("floating-point pixels outside 0.0..1.0 (or not finite); save the image "
                                  "with 8 or 16 bits per channel")
        return _grey(np.rint(values * 255.0))
    if mode == "P" and "transparency" in image.info or mode in ("PA", "LA", "La", "RGBa", "RGBA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise UnreadableImage(f"pixel mode {mode} cannot be converted to RGB ({error})") from None


def _grey(values: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L").convert("RGB")
