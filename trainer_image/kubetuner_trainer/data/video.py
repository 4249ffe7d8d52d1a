"""Video clips: probing, frame windows and decoding (PyAV), and writing MP4/GIF renders.

A video dataset (``dataset_type: video``) trains on windows of ``num_frames`` frames. What a window is:

* **Timeline.** Probing demuxes the clip (no decoding) and records its frame count, duration
  (last presentation time − first + the last frame's duration) and average rate (frames / duration).
  Variable-frame-rate clips are handled through their timestamps, never a nominal rate.
* **Rate.** Without ``--framerate`` the window is ``num_frames`` consecutive frames at the clip's own
  rate (SimpleTuner reads frames as stored). With ``--framerate R`` the clip is resampled: output frame
  ``i`` is the stored frame nearest in time to ``start + i / R`` (ties to the earlier one), so a 60 fps
  clip trains at R fps and a variable-rate clip becomes evenly timed.
* **Start.** Each clip's window start is drawn once from a generator seeded by (``--seed``, dataset id,
  file), like random crops: deterministic, identical after a resume, and stable for the latent cache.
  SimpleTuner always starts at frame 0; a clip exactly ``num_frames`` long behaves the same here.
* **Limits.** ``min_frames``/``max_frames`` are checked against the stored frame count (SimpleTuner's
  rule); a clip with fewer than ``num_frames`` frames at the training rate is left out ("too short").
  The family may shorten ``num_frames`` to a count its VAE encodes whole (``ModelFamily.video_frame_count``).

Decoded windows are ``[3, F, H, W]`` float32 in ``[-1, 1]`` (channels first, then frames: the layout of
diffusers' video VAEs), each frame resized and cropped by the spatial ``SamplePlan`` like an image.
"""

from __future__ import annotations

import bisect
import io
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from .decode import UnreadableImage

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".mpg", ".mpeg"})
#: SimpleTuner's defaults when the ``video`` block leaves ``num_frames`` out: 5 seconds at --framerate (or 30)
DEFAULT_CLIP_SECONDS = 5
DEFAULT_FRAMERATE = 30


def is_video_key(key: str) -> bool:
    dot = key.rfind(".")
    return dot >= 0 and key[dot:].lower() in VIDEO_EXTENSIONS


@dataclass(frozen=True)
class VideoInfo:
    """What probing learns about a clip (sizes in pixels, times in seconds)."""

    width: int
    height: int
    frames: int
    duration: float
    fps: float


@dataclass(frozen=True)
class FrameWindow:
    """Which frames of a clip make one sample: ``count`` frames from output index ``start``.

    ``rate`` is the training frame rate (``--framerate``) or None for the clip's own frames.
    """

    start: int
    count: int
    rate: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"start": self.start, "count": self.count, "rate": self.rate}


def _open(data: bytes) -> Any:
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError, OSError) as error:
        raise UnreadableImage(f"not a readable video ({error.__class__.__name__}: {error})") from None
    if not container.streams.video:
        container.close()
        raise UnreadableImage("the file holds no video stream")
    return container


def probe_video(data: bytes) -> VideoInfo:
    """Size, frame count, duration and average rate of a clip, from its packets (no decoding).

    Raises ``UnreadableImage`` when the bytes are not a video PyAV can demux, hold no video stream or no
    frames, or report an empty size.
    """
    import av

    container = _open(data)
    try:
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        times: list[tuple[int, int]] = []
        try:
            for packet in container.demux(stream):
                if packet.size and packet.pts is not None:
                    times.append((packet.pts, packet.duration or 0))
        except av.FFmpegError as error:
            raise UnreadableImage(f"damaged video ({error.__class__.__name__}: {error})") from None
        base = stream.time_base or Fraction(1, 1)
        rate = float(stream.average_rate or 0)
    finally:
        container.close()
    if width <= 0 or height <= 0:
        raise UnreadableImage(f"video reports an empty size {width}x{height}")
    if not times:
        raise UnreadableImage("the video holds no frames")
    times.sort()
    last_pts, last_duration = times[-1]
    tail = float(last_duration * base) if last_duration else (1.0 / rate if rate else 0.0)
    duration = float((last_pts - times[0][0]) * base) + tail
    fps = len(times) / duration if duration > 0 else rate
    return VideoInfo(width, height, len(times), round(duration, 6), round(fps, 6))


def available_frames(frames: int, duration: float, rate: float | None) -> int:
    """How many output frames a clip yields at ``rate`` (its own frame count when ``rate`` is None)."""
    if rate is None:
        return frames
    return max(0, math.floor(duration * rate + 1e-6))


def plan_window(frames: int, duration: float, *, num_frames: int, min_frames: int | None,
                max_frames: int | None, rate: float | None, rng: random.Random) -> FrameWindow | str:
    """The frame window of one clip, or the reason it is left out (see the module docstring)."""
    if min_frames is not None and frames < min_frames:
        return f"too short: {frames} frames, fewer than min_frames {min_frames}"
    if max_frames is not None and frames > max_frames:
        return f"too long: {frames} frames, more than max_frames {max_frames}"
    available = available_frames(frames, duration, rate)
    if available < num_frames:
        at = f" at {rate:g} fps" if rate is not None else ""
        return f"too short: {available} frames{at}, fewer than num_frames {num_frames}"
    return FrameWindow(rng.randint(0, available - num_frames), num_frames, rate)


def _selected(times: Sequence[float], window: FrameWindow) -> list[int]:
    """Indices of the stored frames (sorted by time) the window takes."""
    if window.rate is None:
        return list(range(window.start, window.start + window.count))
    origin = times[0]
    chosen = []
    for i in range(window.start, window.start + window.count):
        t = origin + i / window.rate
        k = bisect.bisect_left(times, t)
        if k == len(times) or (k > 0 and t - times[k - 1] <= times[k] - t):
            k -= 1
        chosen.append(k)
    return chosen


def decode_window(data: bytes, window: FrameWindow) -> list[Any]:
    """The window's frames as RGB PIL images, in order (a frame may repeat when resampling up).

    Raises ``UnreadableImage`` when the clip cannot be decoded or ends before the window does.
    """
    import av

    container = _open(data)
    frames: list[tuple[float, Any]] = []
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            frames.append((float(frame.time or 0.0), frame.to_image()))
    except av.FFmpegError as error:
        raise UnreadableImage(f"damaged video ({error.__class__.__name__}: {error})") from None
    finally:
        container.close()
    frames.sort(key=lambda item: item[0])
    wanted = _selected([t for t, _ in frames], window)
    if not frames or wanted[-1] >= len(frames):
        raise UnreadableImage(f"the video decodes to {len(frames)} frames, fewer than its window needs "
                              f"({window.start}+{window.count})")
    return [frames[k][1].convert("RGB") for k in wanted]


def write_mp4(frames: Sequence[Any], path: Path, fps: float) -> Path:
    """Write RGB PIL frames as an H.264 MP4 (MPEG-4 Part 2 when the FFmpeg build lacks x264).

    Odd sizes are cropped to even edges (4:2:0 chroma needs them). Returns ``path``.
    """
    import av
    import numpy as np

    width, height = frames[0].size
    width, height = max(2, width // 2 * 2), max(2, height // 2 * 2)
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for image in frames:
            array = np.asarray(image.convert("RGB"))[:height, :width]
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_gif(frames: Sequence[Any], path: Path, fps: float) -> Path:
    """Write RGB PIL frames as a looping GIF (for trackers that show images only). Returns ``path``."""
    duration_ms = max(20, round(1000 / fps))
    frames[0].save(path, save_all=True, append_images=list(frames[1:]), duration=duration_ms, loop=0)
    return path
