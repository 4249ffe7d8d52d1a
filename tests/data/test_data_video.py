"""Video datasets: probing and decoding edge cases, frame windows, buckets, caches, resume, inspect."""

from __future__ import annotations

import io
import json
import random
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from data_builders import PIPELINE_OPTIONS, S3_KEY, S3_SECRET, upload, write_config

from kubetuner_trainer.config.errors import ConfigError
from kubetuner_trainer.data import build_training_data
from kubetuner_trainer.data.dataset_config import DatasetConfigError, load_dataset_config
from kubetuner_trainer.data.decode import UnreadableImage
from kubetuner_trainer.data.settings import DataSettings
from kubetuner_trainer.data.video import FrameWindow, decode_window, plan_window, probe_video
from kubetuner_trainer.tiny import build_tiny_video_dataset


def clip_bytes(width: int, height: int, times_ms: list[int], *, codec: str = "mpeg4") -> bytes:
    """An MP4 whose frame ``i`` is solid grey ``20·i`` shown at ``times_ms[i]`` (variable rate allowed)."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as out:
        stream = out.add_stream(codec, rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for i, t in enumerate(times_ms):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 20 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


def _grey_levels(frames) -> list[int]:
    return [round(float(np.asarray(f).mean()) / 20) for f in frames]


class ClipEncoders:
    """A deterministic stand-in video VAE: 8× spatial pooling, every 4th frame (1 + 4k → 1 + k latent frames)."""

    cache_key = "clip-encoder@test"
    latent_downscale = 8

    def __init__(self):
        self.encoded_shapes: list[tuple[int, ...]] = []

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        self.encoded_shapes.append(tuple(pixels.shape))
        if pixels.dim() == 4:
            pixels = pixels.unsqueeze(2)
        pooled = torch.nn.functional.avg_pool3d(pixels[:, :, ::4], kernel_size=(1, 8, 8))
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)

    def encode_prompts(self, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        return [{"prompt_embeds": torch.full((2, 4), float(len(p)))} for p in prompts]


def _clips_dir(root: Path) -> Path:
    """Four usable clips of 17 frames at 16 fps (two sizes), one too short, one corrupt."""
    build_tiny_video_dataset(root, count=4, frames=17, fps=16, sizes=((64, 48), (48, 64)))
    (root / "short.mp4").write_bytes(clip_bytes(64, 48, [i * 62 for i in range(5)]))
    (root / "short.txt").write_text("short")
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    (root / "broken.txt").write_text("broken")
    return root


def _entry(root: Path, **video) -> dict:
    return {"id": "clips", "type": "local", "dataset_type": "video", "instance_data_dir": str(root),
            "caption_strategy": "textfile", "resolution": 64, "resolution_type": "pixel",
            "video": {"num_frames": 9, "min_frames": 9, **video}}


def _cfg(tmp_path: Path, entries: list[dict], **options) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return {"data_backend_config": write_config(tmp_path / "datasets.json", entries),
            "cache_dir": str(tmp_path / "cache"), "aspect_bucket_alignment": 16, "seed": 5, **PIPELINE_OPTIONS,
            **options}


# -- probing and decoding ----------------------------------------------------------------------------


def test_variable_frame_rate_clip_is_timed_by_its_timestamps_and_resampled_to_the_nearest_frames():
    data = clip_bytes(33, 17, [0, 33, 66, 150, 200, 400, 433])  # odd size, irregular times
    info = probe_video(data)
    assert (info.width, info.height, info.frames) == (33, 17, 7)
    assert info.duration == pytest.approx(0.433 + 0.033, abs=0.01)  # last frame shown for about one frame
    assert info.fps == pytest.approx(7 / info.duration, rel=1e-3)
    # 10 fps: t = 0, .1, .2, .3, .4 -> stored frames 0, 2 (.066 is nearer than .15), 4, 4 (tie: earlier), 5
    frames = decode_window(data, FrameWindow(0, 5, 10.0))
    assert _grey_levels(frames) == [0, 2, 4, 4, 5]
    assert all(f.size == (33, 17) for f in frames)
    # own rate: consecutive stored frames from the window start
    assert _grey_levels(decode_window(data, FrameWindow(2, 3))) == [2, 3, 4]


def test_short_and_corrupt_clips_are_refused_with_a_reason():
    rng = random.Random(0)
    assert plan_window(5, 0.3, num_frames=9, min_frames=9, max_frames=None, rate=None, rng=rng) == \
        "too short: 5 frames, fewer than min_frames 9"
    assert plan_window(40, 2.5, num_frames=9, min_frames=9, max_frames=30, rate=None, rng=rng) == \
        "too long: 40 frames, more than max_frames 30"
    # enough stored frames, but not at the training rate: 10 frames over 0.5 s give 4 frames at 8 fps
    assert plan_window(10, 0.5, num_frames=9, min_frames=9, max_frames=None, rate=8.0, rng=rng) == \
        "too short: 4 frames at 8 fps, fewer than num_frames 9"
    with pytest.raises(UnreadableImage, match="not a readable video"):
        probe_video(b"\x00\x00\x00\x18ftypmp42" + bytes(300))
    data = clip_bytes(32, 32, [0, 40, 80])
    with pytest.raises(UnreadableImage, match="fewer than its window"):
        decode_window(data, FrameWindow(1, 3))


def test_window_start_is_seeded_per_clip_and_always_fits():
    starts = {plan_window(40, 2.5, num_frames=9, min_frames=9, max_frames=None, rate=None,
                          rng=random.Random(seed)).start for seed in range(30)}
    assert len(starts) > 5 and min(starts) >= 0 and max(starts) <= 40 - 9
    again = plan_window(40, 2.5, num_frames=9, min_frames=9, max_frames=None, rate=None, rng=random.Random(7))
    assert again == plan_window(40, 2.5, num_frames=9, min_frames=9, max_frames=None, rate=None,
                                rng=random.Random(7))


# -- the dataset list ----------------------------------------------------------------------------


def test_video_block_defaults_and_rules_follow_simpletuner(tmp_path):
    base = {"id": "v", "type": "local", "dataset_type": "video", "instance_data_dir": str(tmp_path)}
    spec = load_dataset_config([base], DataSettings()).entries[0].video
    assert (spec.num_frames, spec.min_frames, spec.max_frames, spec.is_i2v) == (150, 150, None, None)
    assert load_dataset_config([base], DataSettings(framerate=24)).entries[0].video.num_frames == 120
    with pytest.raises(DatasetConfigError) as error:
        load_dataset_config([{**base, "video": {"num_frames": 17, "min_frames": 9, "max_frame": 3}},
                             {**base, "id": "w", "video": {"num_frames": 17, "min_frames": 9}},
                             {**base, "id": "img", "dataset_type": "image", "video": {"num_frames": 5}}],
                            DataSettings())
    text = str(error.value)
    assert "datasets[v].video={'num_frames': 17" in text and "did you mean 'max_frames'" in text
    assert "datasets[w].video.min_frames=9: must be at least num_frames (17)" in text
    assert "datasets[img].video" in text and "dataset_type 'video'" in text


def test_an_image_family_refuses_a_video_dataset(tmp_path):
    root = build_tiny_video_dataset(tmp_path / "clips", count=1, frames=9)
    with pytest.raises(ConfigError, match=r"datasets\[clips\]\.dataset_type.*model_family sd1x trains on images"):
        build_training_data(_cfg(tmp_path, [_entry(root)], model_family="sd1x"), ClipEncoders())


# -- the pipeline ---------------------------------------------------------------------------------


def _batches(data, count: int):
    out = []
    for batch in data:
        out.append(batch)
        if len(out) == count:
            return out
    raise AssertionError("the data ended")


def test_clips_bucket_by_size_and_frames_cache_and_resume_exactly(tmp_path):
    root = _clips_dir(tmp_path / "clips")
    cfg = _cfg(tmp_path, [_entry(root)])
    encoders = ClipEncoders()
    data = build_training_data(cfg, encoders)
    buckets = data.datasets[0].prepared.buckets.buckets
    assert sorted(buckets) == [(64, 80, 9), (80, 64, 9)]
    skipped = dict(data.datasets[0].prepared.skipped)
    assert skipped["short.mp4"] == "too short: 5 frames, fewer than min_frames 9"
    assert "not a readable video" in skipped["broken.mp4"]
    assert all(shape[2] == 9 for shape in encoders.encoded_shapes)  # [B, 3, F, H, W]
    windows = {p.key: p.frames for ps in buckets.values() for p in ps}
    assert all(w.count == 9 and 0 <= w.start <= 17 - 9 for w in windows.values())

    first = _batches(data, 6)
    assert all(b.latents.shape[1:] in ((4, 3, 8, 10), (4, 3, 10, 8)) for b in first)
    assert all(b.is_i2v is None for b in first)
    state = data.state_dict()
    expected = _batches(data, 3)

    encoders_again = ClipEncoders()
    resumed = build_training_data(cfg, encoders_again)
    assert encoders_again.encoded_shapes == []  # every clip came from the latent cache
    resumed.load_state_dict(state)
    again = _batches(resumed, 3)
    assert [b.paths for b in again] == [b.paths for b in expected]
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(again, expected, strict=True))
    assert {p.key: p.frames for ps in resumed.datasets[0].prepared.buckets.buckets.values() for p in ps} == windows


def test_frame_count_and_rate_are_part_of_the_cache_key(tmp_path):
    root = build_tiny_video_dataset(tmp_path / "clips", count=1, frames=17, fps=16)
    cache = tmp_path / "cache" / "vae" / "clips"
    build_training_data(_cfg(tmp_path, [_entry(root)]), ClipEncoders())
    build_training_data(_cfg(tmp_path, [_entry(root, num_frames=5, min_frames=5)]), ClipEncoders())
    data = build_training_data(_cfg(tmp_path, [_entry(root, num_frames=5, min_frames=5)], framerate=8),
                               ClipEncoders())
    assert len(list(cache.glob("*.safetensors"))) == 3
    plan = next(iter(data.datasets[0].prepared.buckets.buckets.values()))[0]
    assert plan.frames.rate == 8.0 and plan.frames.count == 5 and plan.frames.start <= 8 - 5


def test_s3_video_dataset_matches_local(tmp_path, s3_endpoint, s3_client, s3_bucket, monkeypatch):
    root = build_tiny_video_dataset(tmp_path / "clips", count=2, frames=9)
    upload(s3_client, s3_bucket, "clips/", {p.name: p.read_bytes() for p in root.iterdir()})
    monkeypatch.setenv("KUBETUNER_DATASET_CLIPS_AWS_ACCESS_KEY_ID", S3_KEY)
    monkeypatch.setenv("KUBETUNER_DATASET_CLIPS_AWS_SECRET_ACCESS_KEY", S3_SECRET)
    s3_entry = {**_entry(root), "type": "aws", "instance_data_dir": None, "aws_bucket_name": s3_bucket,
                "aws_data_prefix": "clips/", "aws_endpoint_url": s3_endpoint, "aws_region_name": "us-east-1"}
    remote = build_training_data(_cfg(tmp_path / "s3", [s3_entry]), ClipEncoders())
    local = build_training_data(_cfg(tmp_path / "local", [_entry(root)]), ClipEncoders())
    a, b = _batches(remote, 2), _batches(local, 2)
    assert [x.captions for x in a] == [x.captions for x in b]
    assert all(torch.equal(x.latents, y.latents) for x, y in zip(a, b, strict=True))


# -- inspect --------------------------------------------------------------------------------------


def test_inspect_explains_a_video_dataset(tmp_path, capsys):
    from kubetuner_operator.cli import main

    root = _clips_dir(tmp_path / "clips")
    cfg = write_config(tmp_path / "datasets.json", [_entry(root)])
    code = main(["data", "inspect", cfg, "--train_batch_size", "1", "--aspect_bucket_alignment", "16", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    dataset = report["datasets"][0]
    video = dataset["video"]
    assert video["clips_found"] == 5 and video["clips_usable"] == 4  # the corrupt file is not a clip
    assert video["frame_rates"] == [16.0, pytest.approx(5 / 0.281, abs=0.05)]  # the short clip: 62 ms apart
    assert video["num_frames"] == 9 and video["frames_min"] == 5 and video["frames_max"] == 17
    assert video["seconds_max"] == pytest.approx(17 / 16, abs=0.01)
    assert {b["size"]: b["count"] for b in dataset["buckets"]} == {"64x80x9": 2, "80x64x9": 2}
    reasons = {s["file"]: s["reason"] for s in dataset["skipped"]}
    assert reasons["short.mp4"].startswith("too short") and "not a readable video" in reasons["broken.mp4"]

    main(["data", "inspect", cfg, "--train_batch_size", "1", "--aspect_bucket_alignment", "16"])
    text = capsys.readouterr().out
    assert "usable clips: 4" in text and "training clips: 9 frames at each clip's own rate" in text
    assert "80x64x9" in text and "short.mp4: too short" in text
