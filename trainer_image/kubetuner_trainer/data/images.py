"""Decode an image and turn it into the pixels of its sample plan."""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

from .buckets import SamplePlan
from .metadata import UnreadableImage
from .storage import Storage


def pixels_from_bytes(data: bytes, plan: SamplePlan) -> torch.Tensor:
    """[3, H, W] float32 in [-1, 1] for ``plan``; ``UnreadableImage`` when the file cannot be decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
            if image.format == "JPEG":
                # Let libjpeg decode at a reduced scale when the image is much larger than needed.
                want = plan.intermediate_size
                stored = image.size
                if plan.original_size != stored:  # rotated by EXIF: draft works in stored orientation
                    want = (want[1], want[0])
                image.draft("RGB", want)
            image.load()
            image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        raise UnreadableImage(f"cannot decode image ({error.__class__.__name__}: {error})") from None
    if image.mode != "RGB":
        image = image.convert("RGBA").convert("RGB") if "A" in image.getbands() or image.mode == "P" \
            else image.convert("RGB")
    if image.size != plan.intermediate_size:
        image = image.resize(plan.intermediate_size, Image.Resampling.LANCZOS)
    left, top = plan.crop_left, plan.crop_top
    width, height = plan.target_size
    if (left, top, width, height) != (0, 0, *image.size):
        image = image.crop((left, top, left + width, top + height))
    array = np.asarray(image, dtype=np.uint8)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float()
    return tensor.div_(127.5).sub_(1.0)


def load_pixels(storage: Storage, plan: SamplePlan) -> torch.Tensor:
    return pixels_from_bytes(storage.read(plan.key), plan)
