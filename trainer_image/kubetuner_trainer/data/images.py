"""Decode an image (or a clip's frame window) and turn it into the pixels of its sample plan."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .buckets import SamplePlan
from .debug_logging import log_file
from .decode import decode_rgb
from .storage import Storage
from .video import decode_window


def pixels_from_bytes(data: bytes, plan: SamplePlan) -> torch.Tensor:
    """[3, H, W] float32 in [-1, 1] for ``plan``; ``UnreadableImage`` when the file cannot be used.

    Decoding (every Pillow mode to 8-bit RGB) is ``decode.decode_rgb``, shared with discovery and inspect.
    """
    if plan.frames is not None:
        return video_pixels_from_bytes(data, plan)
    return pixels_from_image(decode_rgb(data, draft_size=plan.intermediate_size), plan)


def video_pixels_from_bytes(data: bytes, plan: SamplePlan) -> torch.Tensor:
    """[3, F, H, W] float32 in [-1, 1]: the plan's frame window, each frame resized and cropped as an image.

    Raises ``UnreadableImage`` when the clip cannot be decoded (``video.decode_window``).
    """
    assert plan.frames is not None
    frames = [pixels_from_image(image, plan) for image in decode_window(data, plan.frames)]
    return torch.stack(frames, dim=1)


def pixels_from_image(image: Image.Image, plan: SamplePlan) -> torch.Tensor:
    """[3, H, W] float32 in [-1, 1]: an RGB image resized to cover the plan's target and cropped to it."""
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
    log_file(storage.describe(), plan.key)  # --print_filenames
    return pixels_from_bytes(storage.read(plan.key), plan)
