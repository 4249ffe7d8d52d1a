"""Properties of bucket sizes and sample plans over many image sizes (hypothesis)."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from kubetuner_trainer.data.buckets import plan_sample, target_size
from kubetuner_trainer.data.dataset_config import parse_dataset_config
from kubetuner_trainer.data.metadata import ImageInfo
from kubetuner_trainer.data.settings import DataSettings

ALIGN = st.sampled_from([8, 16, 24, 32, 64])


@given(aspect=st.floats(0.25, 4.0), resolution=st.integers(256, 2048), alignment=ALIGN,
       rtype=st.sampled_from(["pixel", "pixel_area"]))
@settings(max_examples=300, deadline=None)
def test_target_sizes_are_aligned_and_keep_the_aspect(aspect, resolution, alignment, rtype):
    width, height = target_size(aspect, resolution, rtype, alignment)
    half = alignment / 2
    assert width % alignment == 0 and height % alignment == 0

    def near(value: int, exact: float) -> bool:  # nearest multiple, but never below one multiple
        return abs(value - exact) <= half or (value == alignment and exact < alignment)

    if rtype == "pixel":
        short, long = (height, width) if aspect >= 1 else (width, height)
        assert near(short, resolution)
        assert near(long, int(resolution * max(aspect, 1 / aspect)))
    else:
        edge = max(alignment, round(resolution / alignment) * alignment)
        assert abs(edge - resolution) <= half
        if aspect != 1.0:
            assert near(width, edge * math.sqrt(aspect)) and near(height, edge / math.sqrt(aspect))
        else:
            assert width == height == edge


@given(width=st.integers(16, 3000), height=st.integers(16, 3000), crop=st.booleans(),
       style=st.sampled_from(["random", "center", "corner"]), aspect=st.sampled_from(["square", "preserve"]),
       seed=st.integers(0, 5))
@settings(max_examples=300, deadline=None)
def test_plans_cover_the_target_and_crop_inside_the_image(width, height, crop, style, aspect, seed):
    entry = parse_dataset_config([{"id": "d", "instance_data_dir": "/d", "resolution": 512, "crop": crop,
                                   "crop_style": style, "crop_aspect": aspect}], DataSettings()).entries[0]
    plan = plan_sample(ImageInfo("k.png", "v", width, height), entry, alignment=64, seed=seed)
    iw, ih = plan.intermediate_size
    tw, th = plan.target_size
    assert iw >= tw and ih >= th
    assert 0 <= plan.crop_left <= iw - tw and 0 <= plan.crop_top <= ih - th
    # the resize keeps the image's aspect (up to rounding of one pixel)
    assert abs(iw / ih - width / height) <= (width / height) * (1 / min(iw, ih)) * 2 + 1e-9
    if crop and aspect == "square":
        assert tw == th
