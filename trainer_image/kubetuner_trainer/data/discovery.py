"""Find the images of a dataset and learn their sizes, reusing the metadata cache.

Unreadable files are reported by name with the reason and left out; they are deleted only when
``--delete_problematic_images`` is set.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .metadata import ImageInfo, MetadataCache, UnreadableImage, is_image_key, probe
from .storage import ObjectInfo, Storage
from .video import is_video_key, probe_video

log = logging.getLogger(__name__)

SIDECAR_EXTENSIONS = (".txt", ".parquet", ".json", ".jsonl", ".csv")


@dataclass
class Discovery:
    """The result of discovering one dataset."""

    images: list[ImageInfo] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    ignored: list[str] = field(default_factory=list)  # files that are not images (captions excluded)
    probed: int = 0  # headers actually read this time (the rest came from the metadata cache)
    listed: bool = True  # False when the saved metadata was trusted without listing the storage


def discover(storage: Storage, metadata: MetadataCache, *, trust_cache: bool = False,
             delete_problematic: bool = False, workers: int = 16,
             known_size: Callable[[str], tuple[int, int] | None] | None = None,
             progress: Callable[[int, int], None] | None = None, save_interval: float = 60.0,
             video: bool = False) -> Discovery:
    """List ``storage``, probe new or changed images in parallel and update ``metadata``.

    ``trust_cache`` (``preserve_data_backend_cache`` / ``skip_file_discovery=metadata``) uses the saved
    metadata without listing when it exists. ``known_size`` (e.g. parquet width/height columns) gives
    sizes that need no probing. Progress is saved every ``save_interval`` seconds while probing.
    ``video`` discovers video clips (``data/video.py``) instead of images; clips are read whole to probe.
    """
    result = Discovery()
    had_cache = metadata.load()
    if trust_cache and had_cache:
        result.listed = False
        for key, record in sorted(metadata.files.items()):
            info = metadata.lookup(key, record[0])
            if isinstance(info, ImageInfo):
                result.images.append(info)
            elif isinstance(info, str):
                result.skipped.append((key, info))
        return result

    objects: list[ObjectInfo] = []
    wanted = is_video_key if video else is_image_key
    for obj in storage.list():
        if wanted(obj.key):
            objects.append(obj)
        elif not obj.key.lower().endswith(SIDECAR_EXTENSIONS):
            result.ignored.append(obj.key)
    objects.sort(key=lambda o: o.key)

    todo: list[ObjectInfo] = []
    found: dict[str, ImageInfo | str] = {}
    for obj in objects:
        cached = metadata.lookup(obj.key, obj.version)
        if cached is not None:
            found[obj.key] = cached
        elif not video and known_size is not None and (size := known_size(obj.key)) is not None:
            found[obj.key] = ImageInfo(obj.key, obj.version, int(size[0]), int(size[1]))
        else:
            todo.append(obj)

    def probe_one(obj: ObjectInfo) -> ImageInfo | str:
        if obj.size == 0:
            return "empty file"
        try:
            if video:
                clip = probe_video(storage.read(obj.key))
                return ImageInfo(obj.key, obj.version, clip.width, clip.height, 1, clip.frames, clip.duration,
                                 clip.fps)
            width, height, orientation = probe(storage, obj.key, obj.size)
        except UnreadableImage as error:
            return str(error)
        except FileNotFoundError:
            return "disappeared while scanning"
        return ImageInfo(obj.key, obj.version, width, height, orientation)

    if todo:
        last_save = time.monotonic()
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo)))) as pool:
            for done, (obj, info) in enumerate(zip(todo, pool.map(probe_one, todo), strict=True), 1):
                found[obj.key] = info
                metadata.put(obj.key, obj.version, info)
                if progress and (done % 1000 == 0 or done == len(todo)):
                    progress(done, len(todo))
                if time.monotonic() - last_save > save_interval:
                    metadata.save()  # a restart after a crash re-probes only what came after this
                    last_save = time.monotonic()
    result.probed = len(todo)

    for obj in objects:
        info = found[obj.key]
        metadata.put(obj.key, obj.version, info)
        if isinstance(info, ImageInfo):
            result.images.append(info)
        else:
            result.skipped.append((obj.key, info))
    metadata.retain({o.key for o in objects})
    if todo or not had_cache or len(metadata.files) != len(objects):
        metadata.save()

    if delete_problematic:
        for key, reason in result.skipped:
            log.warning("deleting problematic image %s (%s)", key, reason)
            storage.delete(key)
    for key, reason in result.skipped:
        log.warning("skipping %s in %s: %s", key, storage.describe(), reason)
    return result
