"""Aspect bucket sizes, sample plans, filters and pruning."""

from __future__ import annotations

import pytest

from kubetuner_trainer.data.buckets import assign_buckets, plan_sample, prune_buckets, target_size
from kubetuner_trainer.data.dataset_config import parse_dataset_config
from kubetuner_trainer.data.metadata import ImageInfo
from kubetuner_trainer.data.settings import DataSettings


def _entry(**fields):
    return parse_dataset_config([{"id": "d", "instance_data_dir": "/d", **fields}], DataSettings()).entries[0]


@pytest.mark.parametrize(("aspect", "resolution", "rtype", "expected"), [
    (1.0, 1024, "pixel_area", (1024, 1024)),
    (1.46, 1024, "pixel_area", (1216, 832)),   # 1024*sqrt(1.46)=1237 -> 1216; 1024/sqrt(1.46)=847 -> 832
    (0.68, 1024, "pixel_area", (832, 1216)),
    (1.78, 1024, "pixel_area", (1344, 768)),   # 1366 -> 1344; 767.5 -> 768
    (1.0, 1.0, "area", (1024, 1024)),          # sqrt(1e6)=1000 -> 1024
    (1.5, 1.0, "area", (1280, 832)),           # 1024*1.2247=1254 -> 1280; 836 -> 832
    (1.78, 1024, "pixel", (1792, 1024)),       # short edge 1024, long int(1822.7)=1822 -> 1792
    (0.5, 512, "pixel", (512, 1024)),
])
def test_known_bucket_sizes(aspect, resolution, rtype, expected):
    assert target_size(aspect, resolution, rtype, 64) == expected


def test_alignment_changes_rounding():
    assert target_size(1.46, 1024, "pixel_area", 8) == (1240, 848)  # 1237.3 -> 1240, 847.5 -> 848
    assert target_size(1.0, 64, "pixel_area", 16) == (64, 64)
    # 2012² computed in floats is 4048143.9999999995; the edge must still be 2012 (-> 2016 at alignment 8)
    assert target_size(1.0, 2012, "pixel_area", 8) == (2016, 2016)


def test_plan_resizes_to_cover_then_crops_per_style():
    info = ImageInfo("wide.png", "v1", 256, 128)
    center = plan_sample(info, _entry(resolution=64, crop=True, crop_aspect="square", crop_style="center"),
                         alignment=16)
    assert (center.target_size, center.intermediate_size, center.crop_left, center.crop_top) == \
        ((64, 64), (128, 64), 32, 0)
    corner = plan_sample(info, _entry(resolution=64, crop=True, crop_aspect="square", crop_style="corner"),
                         alignment=16)
    assert (corner.crop_left, corner.crop_top) == (64, 0)
    lefts = {plan_sample(ImageInfo(f"img{i}.png", "v", 256, 128),
                         _entry(resolution=64, crop=True, crop_aspect="square"), alignment=16, seed=5).crop_left
             for i in range(30)}
    assert len(lefts) > 1 and all(0 <= x <= 64 for x in lefts)
    again = plan_sample(ImageInfo("img3.png", "v", 256, 128), _entry(resolution=64, crop=True, crop_aspect="square"),
                        alignment=16, seed=5)
    assert again == plan_sample(ImageInfo("img3.png", "v", 256, 128),
                                _entry(resolution=64, crop=True, crop_aspect="square"), alignment=16, seed=5)
    preserve = plan_sample(info, _entry(resolution=64), alignment=16)
    assert preserve.target_size == (96, 48)  # aspect 2: 64*sqrt2=90.5 -> 96, 45.3 -> 48
    assert preserve.intermediate_size == (96, 48)


def test_closest_crop_aspect_and_sdxl_conventions():
    plan = plan_sample(ImageInfo("p.jpg", "v", 1000, 700), _entry(crop=True, crop_aspect="closest",
                                                                 crop_aspect_buckets=[0.75, 1.0, 1.5]))
    assert plan.target_size == (1280, 832)
    assert plan.crop_coords == (plan.crop_top, plan.crop_left)


def test_filters_report_reasons():
    entry = _entry(resolution=64, minimum_image_size=64, max_upscale_threshold=0.2, maximum_aspect_ratio=1.5)
    small = plan_sample(ImageInfo("small.png", "v", 40, 40), entry, alignment=16)
    assert isinstance(small, str) and "minimum_image_size" in small
    upscale = plan_sample(ImageInfo("up.png", "v", 70, 66), _entry(resolution=96, max_upscale_threshold=0.2),
                          alignment=16)
    assert isinstance(upscale, str) and "upscaling" in upscale
    wide = plan_sample(ImageInfo("wide.png", "v", 300, 100), entry, alignment=16)
    assert isinstance(wide, str) and "maximum_aspect_ratio" in wide


def test_maximum_image_size_downsamples_before_planning():
    entry = _entry(resolution=64, maximum_image_size=512, target_downsample_size=128, resolution_type="pixel")
    plan = plan_sample(ImageInfo("huge.png", "v", 2048, 1024), entry, alignment=16)
    assert plan.original_size == (2048, 1024)
    assert plan.target_size == (128, 64)


def _images(count: int, width: int, height: int, prefix: str) -> list[ImageInfo]:
    return [ImageInfo(f"{prefix}{i:03d}.png", "v", width, height) for i in range(count)]


def test_pruning_and_oversubscription():
    images = _images(10, 64, 64, "sq") + _images(3, 128, 64, "wide")
    entry = _entry(resolution=64)
    result = prune_buckets(assign_buckets(images, entry, alignment=16), entry, effective_batch=4)
    assert list(result.buckets) == [(64, 64)]
    assert result.pruned == {(96, 48): 3}
    assert sum(1 for _, why in result.skipped if "pruned" in why) == 3
    kept = prune_buckets(assign_buckets(images, entry, alignment=16), entry, effective_batch=4, disable_pruning=True)
    assert set(kept.buckets) == {(64, 64), (96, 48)}
    over = prune_buckets(assign_buckets(images, entry, alignment=16), entry, effective_batch=4,
                         allow_oversubscription=True)
    assert over.repeats == 1 and not over.pruned and "raising repeats" in over.warnings[0]
    fixed = _entry(resolution=64, repeats=0)
    manual = prune_buckets(assign_buckets(images, fixed, alignment=16), fixed, effective_batch=4,
                           allow_oversubscription=True)
    assert manual.repeats == 0 and manual.pruned == {(96, 48): 3}


def test_spec_oversubscription_example():
    # 25 images, 8 GPUs, batch 4: effective batch 32 -> repeats 1 -> 50 samples
    entry = _entry(resolution=64)
    result = prune_buckets(assign_buckets(_images(25, 64, 64, "x"), entry, alignment=16), entry, effective_batch=32,
                           allow_oversubscription=True)
    assert result.repeats == 1 and result.sample_count == 25


def test_max_num_samples_is_deterministic():
    entry = _entry(resolution=64, max_num_samples=5)
    first = assign_buckets(_images(20, 64, 64, "a"), entry, alignment=16, seed=1)
    second = assign_buckets(_images(20, 64, 64, "a"), entry, alignment=16, seed=1)
    assert first.sample_count == 5 and first.buckets == second.buckets
    assert sum(1 for _, why in first.skipped if "max_num_samples" in why) == 15
