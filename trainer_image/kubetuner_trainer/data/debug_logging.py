"""The data pipeline's diagnostic logging options.

- ``--debug_aspect_buckets``: every dataset's buckets, pruned buckets and left-out files with the reason
  (logger ``kubetuner_trainer.data.buckets`` at DEBUG).
- ``--debug_dataset_loader``: every assembled batch: epoch, position, dataset, bucket and files
  (logger ``kubetuner_trainer.data.loader`` at DEBUG).
- ``--print_filenames``: each image file as it is read and decoded, to find a corrupt one
  (logger ``kubetuner_trainer.data.files`` at DEBUG).
- ``--print_sampler_statistics``: per dataset samples, buckets, repeats, batches per epoch and share of
  the epoch, logged once the sampler is built (logger ``kubetuner_trainer.data.sampler`` at INFO).

``SIMPLETUNER_LOG_LEVEL=DEBUG`` shows the DEBUG lines too; the options enable them at any log level.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .buckets import bucket_label

if TYPE_CHECKING:
    from .prepare import PreparedDataset
    from .sampler import Sampler
    from .settings import DataSettings

BUCKETS_LOG = logging.getLogger("kubetuner_trainer.data.buckets")
LOADER_LOG = logging.getLogger("kubetuner_trainer.data.loader")
FILES_LOG = logging.getLogger("kubetuner_trainer.data.files")
SAMPLER_LOG = logging.getLogger("kubetuner_trainer.data.sampler")

# option -> the logger it opens at DEBUG
DEBUG_LOGGERS = {"debug_aspect_buckets": BUCKETS_LOG, "debug_dataset_loader": LOADER_LOG,
                 "print_filenames": FILES_LOG}


def apply_debug_logging(settings: DataSettings) -> None:
    """Open the loggers that the enabled options name at DEBUG (the others keep the trainer's level)."""
    for name, logger in DEBUG_LOGGERS.items():
        if getattr(settings, name, False):
            logger.setLevel(logging.DEBUG)


def log_bucket_decisions(prepared: Iterable[PreparedDataset]) -> None:
    """DEBUG: each dataset's buckets (WxH: samples), pruned buckets and every file left out, with why."""
    if not BUCKETS_LOG.isEnabledFor(logging.DEBUG):
        return
    for item in prepared:
        result = item.buckets
        sizes = ", ".join(f"{bucket_label(b)}: {len(plans)}" for b, plans in result.buckets.items()) or "none"
        BUCKETS_LOG.debug("dataset %s: %d samples, repeats %d, buckets %s", item.entry.id, result.sample_count,
                          result.repeats, sizes)
        for (w, h), count in result.pruned.items():
            BUCKETS_LOG.debug("dataset %s: bucket %dx%d pruned (%d samples)", item.entry.id, w, h, count)
        for key, reason in item.skipped:
            BUCKETS_LOG.debug("dataset %s: left out %s: %s", item.entry.id, key, reason)


def log_batch(dataset_id: str, epoch: int, position: int, paths: list[str], bucket: tuple[int, int]) -> None:
    """DEBUG: one assembled batch (``bucket`` is (width, height))."""
    if LOADER_LOG.isEnabledFor(logging.DEBUG):
        LOADER_LOG.debug("epoch %d batch %d: dataset %s, bucket %dx%d, files %s", epoch, position, dataset_id,
                         bucket[0], bucket[1], ", ".join(paths))


def log_file(location: str, key: str) -> None:
    """DEBUG: the file about to be decoded (so the last line before a crash names the culprit)."""
    if FILES_LOG.isEnabledFor(logging.DEBUG):
        FILES_LOG.debug("reading %s/%s", location.rstrip("/"), key)


def sampler_statistics(sampler: Sampler, epoch: int = 0) -> list[dict[str, Any]]:
    """Per dataset: id, samples (with repeats), buckets, repeats, batches in ``epoch`` and their share."""
    schedule = sampler.schedule(epoch)
    total = max(1, len(schedule))
    stats = []
    for index, dataset in enumerate(sampler.datasets):
        batches = sum(1 for i, _ in schedule if i == index)
        stats.append({"dataset": dataset.id, "samples": dataset.sample_count, "buckets": len(dataset.buckets),
                      "repeats": dataset.repeats, "batches": batches, "share": batches / total})
    return stats


def log_sampler_statistics(sampler: Sampler, epoch: int = 0) -> None:
    """INFO: :func:`sampler_statistics` as one line per dataset plus the epoch length."""
    for row in sampler_statistics(sampler, epoch):
        SAMPLER_LOG.info("sampler: dataset %s: %d samples in %d buckets (repeats %d), %d batches per epoch "
                         "(%.1f%%)", row["dataset"], row["samples"], row["buckets"], row["repeats"],
                         row["batches"], row["share"] * 100)
    SAMPLER_LOG.info("sampler: %d batches of %d per rank x %d ranks per epoch, sampling %s",
                     sampler.steps_per_epoch, sampler.batch_size, sampler.world_size, sampler.sampling)
