"""Aspect buckets: the training size of every image, grouped so a batch shares one size.

Target sizes follow SimpleTuner's rules per ``resolution_type``:

- ``pixel``: the shorter edge becomes ``resolution``; the longer edge follows the aspect ratio.
- ``area``: ``resolution`` is megapixels; the square edge ``sqrt(area)`` is scaled by ``sqrt(aspect)`` for
  the width and divided by it for the height.
- ``pixel_area``: ``resolution`` in pixels is turned into the area ``resolution²`` and treated as ``area``
  (1024 → 1024x1024, 1216x832, 832x1216, ...).

Every edge is rounded to the nearest multiple of ``--aspect_bucket_alignment`` (at least one multiple);
aspect ratios are rounded to ``--aspect_bucket_rounding`` decimals (2 by default) first.

How an image reaches its target: it is first shrunk to ``target_downsample_size`` when it exceeds
``maximum_image_size``, then resized (aspect kept) to the smallest size that covers the target, and the
excess is cut: evenly without ``crop``, else placed per ``crop_style`` (``corner`` keeps the bottom-right).
With ``crop`` the bucket's aspect comes from ``crop_aspect``: ``square``, the image's own (``preserve``), the
nearest of ``crop_aspect_buckets`` (``closest``) or a per-image seeded pick among them (``random``).

Video clips are planned the same way per frame and also carry a frame window (``video.FrameWindow``);
their bucket is (width, height, frames), so a batch shares its resolution and its frame count.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from dataclasses import dataclass, field

from .dataset_config import DatasetEntry
from .metadata import ImageInfo
from .video import FrameWindow, plan_window

log = logging.getLogger(__name__)

Size = tuple[int, int]  # (width, height)
#: a bucket: (width, height) for images, (width, height, frames) for video clips
BucketKey = tuple[int, ...]


def bucket_label(key: BucketKey) -> str:
    """``WxH`` for an image bucket, ``WxHxF`` for a video bucket (F frames)."""
    return "x".join(str(v) for v in key)


@dataclass(frozen=True)
class SamplePlan:
    """How one image becomes one training sample (all sizes are (width, height))."""

    key: str
    version: str
    original_size: Size  # after EXIF orientation
    intermediate_size: Size  # what the image is resized to before cropping
    crop_left: int
    crop_top: int
    target_size: Size  # the bucket's size
    frames: FrameWindow | None = None  # video clips: which frames (None for images)

    @property
    def bucket(self) -> BucketKey:
        """The bucket key: the target size, plus the frame count for a clip."""
        return self.target_size if self.frames is None else (*self.target_size, self.frames.count)

    @property
    def crop_coords(self) -> tuple[int, int]:
        """(top, left), the SDXL micro-conditioning convention."""
        return self.crop_top, self.crop_left

    def geometry(self) -> dict[str, object]:
        """What shapes the sample's pixels (part of its latent-cache fingerprint)."""
        geometry: dict[str, object] = {"original": list(self.original_size),
                                       "intermediate": list(self.intermediate_size),
                                       "crop": [self.crop_left, self.crop_top], "target": list(self.target_size)}
        if self.frames is not None:
            geometry["frames"] = self.frames.as_dict()
        return geometry


@dataclass
class BucketResult:
    buckets: dict[BucketKey, list[SamplePlan]] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    pruned: dict[BucketKey, int] = field(default_factory=dict)  # bucket -> samples removed
    repeats: int = 0  # repeats in effect (may be raised by oversubscription)
    warnings: list[str] = field(default_factory=list)

    @property
    def sample_count(self) -> int:
        return sum(len(v) for v in self.buckets.values())


def round_to_multiple(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple) * multiple))


def target_size(aspect: float, resolution: float, resolution_type: str, alignment: int = 64) -> Size:
    """The bucket (width, height) for an aspect ratio (width / height) at a resolution."""
    if resolution_type == "pixel":
        if aspect >= 1:
            return round_to_multiple(int(resolution * aspect), alignment), round_to_multiple(resolution, alignment)
        return round_to_multiple(resolution, alignment), round_to_multiple(int(resolution / aspect), alignment)
    if resolution_type == "pixel_area":
        square_edge = float(resolution)  # the side of the square of area resolution²
    elif resolution_type == "area":
        square_edge = math.sqrt(resolution * 1e6)
    else:
        raise ValueError(f"resolution_type {resolution_type!r} is not one of: pixel, pixel_area, area")
    edge = round_to_multiple(int(square_edge + 1e-6), alignment)  # 1e-6: no float noise below an integer
    if aspect == 1.0:
        return edge, edge
    root = math.sqrt(aspect)
    return round_to_multiple(edge * root, alignment), round_to_multiple(edge / root, alignment)


def _too_large(size: Size, limit: float, resolution_type: str) -> bool:
    width, height = size
    if resolution_type == "pixel":
        return max(width, height) > limit
    area_limit = limit * limit if resolution_type == "pixel_area" else limit * 1e6
    return width * height > area_limit


def _too_small(size: Size, minimum: float, resolution_type: str) -> bool:
    width, height = size
    if resolution_type == "pixel":
        return min(width, height) < minimum
    area_minimum = minimum * minimum if resolution_type == "pixel_area" else minimum * 1e6
    return width * height < area_minimum


def _downsampled(size: Size, target: float, resolution_type: str) -> Size:
    width, height = size
    if resolution_type == "pixel":
        scale = target / min(width, height)
    else:
        area = target * target if resolution_type == "pixel_area" else target * 1e6
        scale = math.sqrt(area / (width * height))
    scale = min(scale, 1.0)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _sample_rng(seed: int, dataset_id: str, key: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}\0{dataset_id}\0{key}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def plan_sample(info: ImageInfo, entry: DatasetEntry, *, alignment: int = 64, rounding: int | None = None,
                seed: int = 0, num_frames: int | None = None, framerate: float | None = None) -> SamplePlan | str:
    """The plan for one image or clip, or the reason it is left out. Deterministic for a given seed.

    For a clip of a video entry, ``num_frames`` (the entry's, as the family encodes it) and ``framerate``
    (``--framerate`` or None) shape its frame window (``video.plan_window``).
    """
    digits = 2 if rounding is None else rounding
    rtype, resolution = entry.resolution_type, entry.resolution
    original = info.size
    if entry.minimum_image_size is not None and _too_small(original, entry.minimum_image_size, rtype):
        return f"smaller than minimum_image_size {entry.minimum_image_size:g} ({original[0]}x{original[1]})"
    source = original
    if (entry.maximum_image_size is not None and entry.target_downsample_size is not None
            and _too_large(original, entry.maximum_image_size, rtype)):
        source = _downsampled(original, entry.target_downsample_size, rtype)
    image_aspect = round(source[0] / source[1], digits)
    rng = _sample_rng(seed, entry.id, info.key)
    aspect = image_aspect
    if entry.crop:
        if entry.crop_aspect == "square":
            aspect = 1.0
        elif entry.crop_aspect == "closest":
            aspect = min(entry.crop_aspect_buckets, key=lambda a: (abs(a - image_aspect), a))
        elif entry.crop_aspect == "random":
            aspect = rng.choice(entry.crop_aspect_buckets)
    aspect = round(aspect, digits)
    if entry.minimum_aspect_ratio is not None and aspect < entry.minimum_aspect_ratio:
        return f"aspect ratio {aspect:g} is below minimum_aspect_ratio {entry.minimum_aspect_ratio:g}"
    if entry.maximum_aspect_ratio is not None and aspect > entry.maximum_aspect_ratio:
        return f"aspect ratio {aspect:g} is above maximum_aspect_ratio {entry.maximum_aspect_ratio:g}"
    target = target_size(aspect, resolution, rtype, alignment)

    cover = max(target[0] / source[0], target[1] / source[1])
    if entry.max_upscale_threshold is not None and cover - 1 > entry.max_upscale_threshold + 1e-9:
        return (f"needs {100 * (cover - 1):.0f}% upscaling to {target[0]}x{target[1]}, more than "
                f"max_upscale_threshold {entry.max_upscale_threshold:g}")
    intermediate = (max(target[0], round(source[0] * cover)), max(target[1], round(source[1] * cover)))
    spare_w, spare_h = intermediate[0] - target[0], intermediate[1] - target[1]
    style = entry.crop_style if entry.crop else "center"
    if style == "center":
        left, top = spare_w // 2, spare_h // 2
    elif style == "corner":
        left, top = spare_w, spare_h  # bottom-right corner
    else:
        left, top = rng.randint(0, spare_w), rng.randint(0, spare_h)
    window = None
    if entry.video is not None:
        spec = entry.video
        window = plan_window(info.frames, info.duration, num_frames=num_frames or spec.num_frames,
                             min_frames=spec.min_frames, max_frames=spec.max_frames,
                             rate=float(framerate) if framerate else None,
                             rng=_sample_rng(seed, entry.id, info.key + "\0frames"))
        if isinstance(window, str):
            return window
    return SamplePlan(info.key, info.version, original, intermediate, left, top, target, window)


def assign_buckets(images: list[ImageInfo], entry: DatasetEntry, *, alignment: int = 64,
                   rounding: int | None = None, seed: int = 0, num_frames: int | None = None,
                   framerate: float | None = None) -> BucketResult:
    """Plan every image (or clip) and group the plans by bucket (buckets sorted, samples sorted by key)."""
    result = BucketResult(repeats=entry.repeats)
    for info in images:
        plan = plan_sample(info, entry, alignment=alignment, rounding=rounding, seed=seed, num_frames=num_frames,
                           framerate=framerate)
        if isinstance(plan, str):
            result.skipped.append((info.key, plan))
        else:
            result.buckets.setdefault(plan.bucket, []).append(plan)
    if entry.max_num_samples is not None and result.sample_count > entry.max_num_samples:
        _limit(result, entry, seed)
    result.buckets = {size: sorted(plans, key=lambda p: p.key) for size, plans in sorted(result.buckets.items())}
    return result


def _limit(result: BucketResult, entry: DatasetEntry, seed: int) -> None:
    plans = sorted((p for ps in result.buckets.values() for p in ps), key=lambda p: p.key)
    rng = random.Random(f"{seed}:{entry.id}:max_num_samples")
    keep = {p.key for p in rng.sample(plans, entry.max_num_samples or len(plans))}
    for size in list(result.buckets):
        dropped = [p for p in result.buckets[size] if p.key not in keep]
        result.skipped.extend((p.key, f"over max_num_samples {entry.max_num_samples}") for p in dropped)
        result.buckets[size] = [p for p in result.buckets[size] if p.key in keep]
        if not result.buckets[size]:
            del result.buckets[size]


def prune_buckets(result: BucketResult, entry: DatasetEntry, *, effective_batch: int,
                  disable_pruning: bool = False, allow_oversubscription: bool = False) -> BucketResult:
    """Drop buckets holding fewer samples than one effective batch (counting repeats).

    With ``allow_oversubscription`` and no ``repeats`` in the entry, ``repeats`` is raised instead so that
    every bucket fills one effective batch. With ``disable_pruning`` small buckets are kept (the sampler
    then reuses samples within a batch).
    """
    if not result.buckets:
        return result
    smallest = min(len(v) for v in result.buckets.values())
    if allow_oversubscription and not entry.repeats_set and smallest * (result.repeats + 1) < effective_batch:
        needed = math.ceil(effective_batch / smallest) - 1
        result.warnings.append(
            f"dataset {entry.id}: raising repeats from {result.repeats} to {needed} so that its smallest bucket "
            f"({smallest} images) fills one effective batch of {effective_batch} (allow_dataset_oversubscription)")
        result.repeats = needed
    if disable_pruning:
        return result
    for size in list(result.buckets):
        count = len(result.buckets[size]) * (result.repeats + 1)
        if count < effective_batch:
            plans = result.buckets.pop(size)
            result.pruned[size] = len(plans)
            reason = (f"bucket {bucket_label(size)} has {count} samples, fewer than the effective batch "
                      f"{effective_batch}; pruned")
            result.skipped.extend((p.key, reason) for p in plans)
    if result.pruned:
        result.warnings.append(
            f"dataset {entry.id}: pruned {sum(result.pruned.values())} images in {len(result.pruned)} buckets "
            f"smaller than the effective batch {effective_batch} (train_batch_size x processes x gradient "
            "accumulation); add images, raise repeats, or set disable_bucket_pruning / "
            "allow_dataset_oversubscription")
    return result
