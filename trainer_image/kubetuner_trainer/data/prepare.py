"""Everything that happens to a dataset before encoding: storage, discovery, captions, buckets.

Shared by the trainer (``pipeline``) and ``kubetuner data inspect`` so both see the same result.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from kubetuner_trainer.config.errors import Problem

from .buckets import BucketResult, assign_buckets, prune_buckets
from .captions import Captioner, CaptionError
from .credentials import resolve_credentials
from .dataset_config import DatasetConfig, DatasetConfigError, DatasetEntry
from .discovery import Discovery, discover
from .locations import entry_location_problem
from .metadata import MetadataCache
from .settings import DataSettings
from .storage import LocalStorage, Storage, StorageError

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """The datasets cannot feed training (e.g. nothing left after filtering); the message says why."""


def open_dataset_storage(entry: DatasetEntry, settings: DataSettings, environ: Mapping[str, str] | None = None,
                         *, prefix: str | None = None) -> Storage:
    """The storage holding ``entry``'s files (or, with ``prefix``, another folder of the same bucket)."""
    environ = os.environ if environ is None else environ
    if entry.type == "aws":
        from .storage.s3 import S3Storage

        key, secret, source = resolve_credentials(entry, environ)
        log.info("dataset %s: S3 credentials from the %s", entry.id, source)
        return S3Storage(entry.aws_bucket_name or "", entry.aws_data_prefix if prefix is None else prefix,
                         region=entry.aws_region_name, endpoint_url=entry.aws_endpoint_url, access_key_id=key,
                         secret_access_key=secret, max_pool_connections=settings.aws_max_pool_connections)
    root = entry.instance_data_dir if prefix is None else prefix
    return LocalStorage(root or ".")


@dataclass
class PreparedDataset:
    entry: DatasetEntry
    storage: Storage
    discovery: Discovery
    captions: dict[str, str]
    buckets: BucketResult
    caption_problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """Every file left out, with the reason (unreadable, filtered, no caption, pruned)."""
        return [*self.discovery.skipped, *self.caption_problems, *self.buckets.skipped]


def metadata_storage(settings: DataSettings) -> LocalStorage:
    return LocalStorage(os.path.join(settings.cache_root, "metadata"))


def prepare_dataset(entry: DatasetEntry, settings: DataSettings, *, environ: Mapping[str, str] | None = None,
                    metadata_store: Storage | None = None, storage: Storage | None = None,
                    progress: Callable[[str, int, int], None] | None = None) -> PreparedDataset:
    """Discover, caption and bucket one image dataset (pruning included)."""
    storage = storage or open_dataset_storage(entry, settings, environ)
    try:
        missing = entry_location_problem(entry, storage)
    except StorageError as error:
        raise DataError(f"dataset {entry.id}: cannot reach {storage.describe()}: {error}") from error
    if missing:
        raise DatasetConfigError([missing])
    try:
        captioner = Captioner(entry, storage, workers=settings.max_workers)
    except CaptionError as error:
        raise DatasetConfigError([Problem(f"datasets[{entry.id}].parquet", entry.parquet.path if entry.parquet
                                          else None, str(error))]) from None
    metadata = MetadataCache(metadata_store, f"{entry.id}.json", entry.id, storage.describe())
    trust = entry.preserve_data_backend_cache or entry.skips("metadata")
    video = entry.video is not None
    try:
        found = discover(storage, metadata, trust_cache=trust, delete_problematic=settings.delete_problematic_images,
                         workers=settings.max_workers, save_interval=settings.metadata_update_interval,
                         known_size=captioner.known_size if captioner.parquet_sizes else None,
                         progress=(lambda d, t: progress(entry.id, d, t)) if progress else None, video=video)
    except StorageError as error:
        raise DataError(f"dataset {entry.id}: cannot list {storage.describe()}: {error}") from error
    keys = [info.key for info in found.images]
    captions, caption_problems = captioner.captions(keys)
    usable = [info for info in found.images if info.key in captions]
    buckets = assign_buckets(usable, entry, alignment=settings.aspect_bucket_alignment,
                             rounding=settings.aspect_bucket_rounding, seed=settings.seed,
                             num_frames=clip_frames(entry, settings) if video else None,
                             framerate=settings.framerate if video else None)
    prune_buckets(buckets, entry, effective_batch=settings.effective_batch_size,
                  # an evaluation dataset is read in any batch size: every image counts
                  disable_pruning=settings.disable_bucket_pruning or entry.dataset_type == "eval",
                  allow_oversubscription=settings.allow_dataset_oversubscription)
    for message in buckets.warnings:
        log.warning(message)
    log_skipped(entry.id, [*caption_problems, *buckets.skipped])
    return PreparedDataset(entry, storage, found, captions, buckets, caption_problems)


def clip_frames(entry: DatasetEntry, settings: DataSettings) -> int:
    """Frames per clip of a video entry: its ``num_frames``, shortened to a count the model family encodes
    whole (``ModelFamily.video_frame_count``; unchanged when the family is unset or not built)."""
    assert entry.video is not None
    from kubetuner_trainer.models.registry import implemented_families

    num = entry.video.num_frames
    if settings.model_family not in implemented_families():
        return num
    from kubetuner_trainer.models.registry import family_class

    family = family_class(settings.model_family)
    if not family.is_video:
        video_families = [f for f in implemented_families() if family_class(f).is_video]
        raise DatasetConfigError([Problem(f"datasets[{entry.id}].dataset_type", "video",
                                          f"model_family {settings.model_family} trains on images; video datasets "
                                          f"need a video family: {', '.join(video_families) or 'none built yet'}")])
    usable = family.video_frame_count(num)
    if usable != num:
        log.warning("dataset %s: training on %d frames per clip instead of num_frames %d, the nearest count the "
                    "%s VAE encodes without dropping frames", entry.id, usable, num, settings.model_family)
    return usable


def drop_unusable(item: PreparedDataset, failed: list[tuple[str, str]], settings: DataSettings) -> None:
    """Leave out files that could not be decoded and prune the buckets again.

    The one verdict on a file for the trainer (latent caching) and ``kubetuner data inspect``: both decode
    with ``decode.decode_rgb`` and then call this, so bucket counts and the batch check agree.
    """
    if not failed:
        return
    bad = {key for key, _ in failed}
    result = item.buckets
    for size in list(result.buckets):
        result.buckets[size] = [p for p in result.buckets[size] if p.key not in bad]
        if not result.buckets[size]:
            del result.buckets[size]
    result.skipped.extend(failed)
    prune_buckets(result, item.entry, effective_batch=settings.effective_batch_size,
                  disable_pruning=settings.disable_bucket_pruning or item.entry.dataset_type == "eval",
                  allow_oversubscription=settings.allow_dataset_oversubscription)


def log_skipped(dataset_id: str, skipped: list[tuple[str, str]], *, limit: int = 20) -> None:
    """Name each file left out (the first ``limit``), so the training log says what inspect would."""
    for key, reason in skipped[:limit]:
        log.warning("dataset %s: leaving out %s: %s", dataset_id, key, reason)
    if len(skipped) > limit:
        log.warning("dataset %s: %d more files left out; `kubetuner data inspect` lists them all", dataset_id,
                    len(skipped) - limit)


def prepare_all(config: DatasetConfig, settings: DataSettings, *, environ: Mapping[str, str] | None = None,
                write_metadata: bool = True,
                progress: Callable[[str, int, int], None] | None = None) -> list[PreparedDataset]:
    store = metadata_storage(settings) if write_metadata else None
    return [prepare_dataset(entry, settings, environ=environ, metadata_store=store, progress=progress)
            for entry in config.image_datasets]
