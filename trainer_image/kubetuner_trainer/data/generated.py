"""Generated conditioning datasets: SimpleTuner's ``conditioning`` block of an image dataset entry.

A block ``{"type": "superresolution", "conditioning_type": "reference_strict", ...}`` (or a list of them)
turns into a conditioning dataset with id ``<source id>_conditioning_<type>`` whose files are derived from
the source dataset's files, one per file under the same relative path, written (atomically, once) to the
block's ``instance_data_dir`` or ``{cache_dir}/conditioning_data/<that id>`` (SimpleTuner's layout).

Types built here need no downloaded model (names and aliases as SimpleTuner 3.1.6 registers them):

- ``superresolution`` (``super_resolution``, ``lowres``): optional down-and-up scale (``downscale_factor``),
  blur (``blur_radius`` 2.0, ``blur_type`` gaussian/box/both), Gaussian noise (``add_noise`` true,
  ``noise_level`` 0.02 of full scale), optional JPEG (``jpeg_quality``).
- ``jpeg_artifacts`` (``jpeg``, ``compression``): ``quality`` 25 (``quality_mode`` fixed), ``range`` over
  ``quality_range`` [10, 50] or ``random`` from ``quality_list`` [10, 20, 30, 40]; ``compression_rounds`` 1
  with ``round_quality_decay`` 0.9 per round.
- ``random_masks`` (``masks``, ``inpainting``): white shapes (``mask_types`` rectangle/circle/brush/irregular)
  on black until ``min_coverage``..``max_coverage`` (0.1..0.5) is reached, ``min_masks``..``max_masks``
  shapes, ``invert_mask``; ``output_mode`` ``mask`` or ``masked_image`` (the source with masked areas grey).
- ``canny`` (``edges``): OpenCV's Canny edge map (``low_threshold`` 100, ``high_threshold`` 200) as RGB.

Randomness (noise, quality draws, masks) is seeded by (``--seed``, dataset id, file key): a file's
conditioning image is the same in every run, so its latent-cache entry stays valid.
Types that need a downloaded model (``depth``, ``segmentation``, ``optical_flow``) or video sources
(``i2v_first_frame``) are refused by name.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
from collections.abc import Callable, Mapping
from typing import Any

#: alias -> canonical generator name (the ones built here)
GENERATED_TYPES = {
    "superresolution": "superresolution", "super_resolution": "superresolution", "lowres": "superresolution",
    "jpeg_artifacts": "jpeg_artifacts", "jpeg": "jpeg_artifacts", "compression": "jpeg_artifacts",
    "random_masks": "random_masks", "masks": "random_masks", "inpainting": "random_masks",
    "canny": "canny", "edges": "canny",
}
#: SimpleTuner's other generator names: valid there, refused here with the reason
PLANNED_GENERATED_TYPES = {
    "depth": "needs a depth-estimation model download", "depth_map": "needs a depth-estimation model download",
    "depth_midas": "needs a depth-estimation model download",
    "segmentation": "needs a segmentation model download",
    "semantic_segmentation": "needs a segmentation model download",
    "optical_flow": "needs an optical-flow model download", "flow": "needs an optical-flow model download",
    "i2v_first_frame": "takes video sources", "wan_i2v_first_frame": "takes video sources",
}
#: keys of a conditioning block that describe the generated dataset rather than the generator
BLOCK_DATASET_KEYS = ("type", "conditioning_type", "instance_data_dir", "captions", "caption_strategy",
                      "instance_prompt")


def generated_id(source_id: str, kind: str) -> str:
    """The id SimpleTuner gives a generated conditioning dataset: ``<source>_conditioning_<type>``."""
    return f"{source_id}_conditioning_{kind}"


def _rng(seed: int, dataset_id: str, key: str):
    import numpy as np

    digest = hashlib.sha256(f"{seed}\0{dataset_id}\0{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


def _jpeg(image: Any, quality: int) -> Any:
    from PIL import Image

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(max(1, min(95, quality))))
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def _superresolution(image: Any, options: Mapping[str, Any], rng: Any) -> Any:
    import numpy as np
    from PIL import Image, ImageFilter

    result = image.copy()
    factor = options.get("downscale_factor")
    if factor and float(factor) > 1:
        small = (max(1, int(result.width / float(factor))), max(1, int(result.height / float(factor))))
        result = result.resize(small, Image.Resampling.BILINEAR).resize(image.size, Image.Resampling.BILINEAR)
    radius = float(options.get("blur_radius", 2.0))
    kind = options.get("blur_type", "gaussian")
    if kind == "gaussian":
        result = result.filter(ImageFilter.GaussianBlur(radius))
    elif kind == "box":
        result = result.filter(ImageFilter.BoxBlur(radius))
    elif kind == "both":
        result = result.filter(ImageFilter.BoxBlur(radius * 0.7)).filter(ImageFilter.GaussianBlur(radius * 0.7))
    level = float(options.get("noise_level", 0.02))
    if options.get("add_noise", True) and level > 0:
        array = np.asarray(result, dtype=np.float32) / 255.0
        array = np.clip(array + rng.normal(0.0, level, array.shape), 0.0, 1.0)
        result = Image.fromarray((array * 255).astype(np.uint8))
    if options.get("jpeg_quality") is not None:
        result = _jpeg(result, int(options["jpeg_quality"]))
    return result


def _jpeg_artifacts(image: Any, options: Mapping[str, Any], rng: Any) -> Any:
    mode = options.get("quality_mode", "fixed")
    if mode == "range":
        low, high = options.get("quality_range", (10, 50))
        quality = int(rng.integers(int(low), int(high) + 1))
    elif mode == "random":
        choices = list(options.get("quality_list", [10, 20, 30, 40]))
        quality = int(choices[int(rng.integers(0, len(choices)))])
    else:
        quality = int(options.get("quality", 25))
    result = image
    for _ in range(int(options.get("compression_rounds", 1))):
        result = _jpeg(result, quality)
        quality = int(quality * float(options.get("round_quality_decay", 0.9)))
    return result


def _random_masks(image: Any, options: Mapping[str, Any], rng: Any) -> Any:
    import numpy as np
    from PIL import Image, ImageDraw

    width, height = image.size
    mask = Image.new("L", image.size, 0)
    draw = ImageDraw.Draw(mask)
    kinds = list(options.get("mask_types", ["rectangle", "circle", "brush", "irregular"]))
    low_cover, high_cover = float(options.get("min_coverage", 0.1)), float(options.get("max_coverage", 0.5))
    goal = rng.uniform(low_cover, high_cover)
    count = int(rng.integers(int(options.get("min_masks", 1)), int(options.get("max_masks", 5)) + 1))
    short = min(width, height)
    for index in range(max(count, 1) * 8):
        if index >= count and np.asarray(mask).mean() / 255.0 >= goal:
            break
        kind = kinds[int(rng.integers(0, len(kinds)))]
        x, y = float(rng.uniform(0, width)), float(rng.uniform(0, height))
        if kind == "circle":
            r = short * rng.uniform(0.05, 0.2)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
        elif kind == "brush":
            length = short * rng.uniform(0.1, 0.5)
            angle = rng.uniform(0, 2 * np.pi)
            end = (x + length * np.cos(angle), y + length * np.sin(angle))
            draw.line((x, y, *end), fill=255, width=int(rng.integers(5, 41)))
        elif kind == "irregular":
            points = [(x + short * rng.uniform(-0.2, 0.2), y + short * rng.uniform(-0.2, 0.2))
                      for _ in range(int(rng.integers(5, 21)))]
            draw.polygon(points, fill=255)
        else:
            w, h = width * rng.uniform(0.1, 0.4), height * rng.uniform(0.1, 0.4)
            draw.rectangle((x - w / 2, y - h / 2, x + w / 2, y + h / 2), fill=255)
    if options.get("invert_mask", False):
        mask = Image.eval(mask, lambda v: 255 - v)
    if options.get("output_mode", "mask") == "masked_image":
        grey = Image.new("RGB", image.size, (128, 128, 128))
        return Image.composite(grey, image, mask)
    return mask.convert("RGB")


def _canny(image: Any, options: Mapping[str, Any], rng: Any) -> Any:
    import cv2
    import numpy as np
    from PIL import Image

    grey = cv2.cvtColor(np.asarray(image, dtype=np.uint8), cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(grey, float(options.get("low_threshold", 100)), float(options.get("high_threshold", 200)))
    return Image.fromarray(cv2.cvtColor(edges, cv2.COLOR_GRAY2RGB))


_GENERATORS: dict[str, Callable[[Any, Mapping[str, Any], Any], Any]] = {
    "superresolution": _superresolution, "jpeg_artifacts": _jpeg_artifacts,
    "random_masks": _random_masks, "canny": _canny,
}


def generate(kind: str, image: Any, options: Mapping[str, Any], *, seed: int, dataset_id: str, key: str) -> Any:
    """The conditioning image (RGB, same size) derived from ``image`` by generator ``kind`` (or an alias).

    ``options`` is the ``conditioning`` block; randomness is seeded by (``seed``, ``dataset_id``, ``key``).
    Raises ``KeyError`` for a type not built here (the dataset list refuses those first).
    """
    return _GENERATORS[GENERATED_TYPES[kind]](image.convert("RGB"), options, _rng(seed, dataset_id, key))


def encoded(image: Any, key: str) -> bytes:
    """``image`` saved in the format its file name says (PNG for anything but JPEG/WebP names)."""
    ext = posixpath.splitext(key)[1].lower()
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(ext, "PNG")
    buffer = io.BytesIO()
    kwargs = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()
