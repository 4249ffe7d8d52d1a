"""Image sizes from file headers, and the per-dataset metadata cache.

Only the header of an image is parsed (Pillow opens lazily and does not decode pixels), so probing
is cheap even on S3, where only the first bytes of each object are fetched. Sizes are stored after
EXIF orientation: a portrait photo stored landscape with orientation 6 is reported as portrait.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from .decode import UnreadableImage, exif_orientation, open_image
from .storage import Storage

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
HEAD_BYTES = 64 * 1024
METADATA_FORMAT = 1


@dataclass(frozen=True)
class ImageInfo:
    """What discovery knows about one image file."""

    key: str
    version: str
    width: int  # after EXIF orientation
    height: int
    orientation: int = 1
    #: video clips only (``data/video.py``): stored frames, seconds, average frames per second
    frames: int = 0
    duration: float = 0.0
    fps: float = 0.0

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


def is_image_key(key: str) -> bool:
    dot = key.rfind(".")
    return dot >= 0 and key[dot:].lower() in IMAGE_EXTENSIONS


def probe_bytes(data: bytes) -> tuple[int, int, int]:
    """(width, height, orientation) from the start of an image file; widths are after EXIF rotation.

    Raises ``UnreadableImage`` when the bytes do not start a known image format, the header is cut off,
    or the pixel mode is one training cannot use (``decode.open_image`` decides, for training too).
    """
    with open_image(data) as image:
        width, height = image.size
        orientation = exif_orientation(image)
    if width <= 0 or height <= 0:
        raise UnreadableImage(f"image header reports an empty size {width}x{height}")
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return width, height, orientation


def probe(storage: Storage, key: str, size: int) -> tuple[int, int, int]:
    """Probe one stored image, reading only its first bytes unless the header is longer."""
    head = storage.read_range(key, 0, HEAD_BYTES) if size > HEAD_BYTES else storage.read(key)
    try:
        return probe_bytes(head)
    except UnreadableImage:
        if len(head) >= size:
            raise
    return probe_bytes(storage.read(key))  # long EXIF/ICC blocks: fall back to the whole file


class MetadataCache:
    """Per-dataset record of every probed file keyed by its version, saved atomically as JSON.

    Unchanged files (same version: size+mtime locally, ETag on S3) are never probed again.
    """

    def __init__(self, storage: Storage | None, key: str, dataset_id: str, location: str):
        self.storage = storage
        self.key = key
        self.dataset_id = dataset_id
        self.location = location
        self.files: dict[str, list[Any]] = {}
        self.loaded = False

    def load(self) -> bool:
        """Read the saved record; False when missing, unreadable or made for another location."""
        if self.storage is None:
            return False
        try:
            raw = json.loads(self.storage.read(self.key))
        except FileNotFoundError:
            return False
        except (OSError, ValueError) as error:
            log.warning("dataset %s: ignoring unreadable metadata cache %s (%s)", self.dataset_id, self.key, error)
            return False
        if (not isinstance(raw, dict) or raw.get("format") != METADATA_FORMAT
                or raw.get("location") != self.location or not isinstance(raw.get("files"), dict)):
            return False
        self.files = raw["files"]
        self.loaded = True
        return True

    def lookup(self, key: str, version: str) -> ImageInfo | str | None:
        """The cached info (or the cached error text) when ``version`` matches; None otherwise."""
        record = self.files.get(key)
        if not record or record[0] != version:
            return None
        if record[1] is None:
            return str(record[3])
        video = (int(record[4]), float(record[5]), float(record[6])) if len(record) >= 7 else (0, 0.0, 0.0)
        return ImageInfo(key, version, int(record[1]), int(record[2]), int(record[3]), *video)

    def put(self, key: str, version: str, value: ImageInfo | str) -> None:
        if isinstance(value, ImageInfo):
            self.files[key] = [version, value.width, value.height, value.orientation]
            if value.frames:
                self.files[key] += [value.frames, value.duration, value.fps]
        else:
            self.files[key] = [version, None, None, value]

    def retain(self, keys: set[str]) -> None:
        """Forget files that no longer exist."""
        self.files = {k: v for k, v in self.files.items() if k in keys}

    def save(self) -> None:
        if self.storage is None:
            return
        body = {"format": METADATA_FORMAT, "dataset": self.dataset_id, "location": self.location,
                "files": self.files}
        self.storage.write(self.key, json.dumps(body, separators=(",", ":")).encode())
