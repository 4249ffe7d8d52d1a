"""Pre-flight: every dataset location exists and is reachable, checked before the model loads.

Loading a real model takes minutes; a misspelled folder or bucket must be reported before that, with
the path named ("/data/shapez does not exist"), as a configuration error. Stores that cannot be reached
right now (network faults) are not configuration errors: they are logged and left to discovery, whose
retries and transient-error handling apply.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from kubetuner_trainer.config.errors import Problem

from .dataset_config import DatasetConfig, DatasetEntry
from .settings import DataSettings
from .storage import Storage, StorageError

log = logging.getLogger(__name__)


def location_problems(config: DatasetConfig, settings: DataSettings,
                      environ: Mapping[str, str] | None = None) -> list[Problem]:
    """One problem per enabled image dataset whose folder or bucket/prefix cannot hold its files.

    The option named is ``datasets[<id>].instance_data_dir`` (local) or ``datasets[<id>].aws_data_prefix``
    (S3). Never raises for transient store faults (they are logged as warnings).
    """
    from .prepare import open_dataset_storage

    environ = os.environ if environ is None else environ
    problems = []
    stored = tuple(c for c in config.conditioning_datasets if c.generator is None)  # generated ones are written
    for entry in config.image_datasets + stored:
        try:
            problem = entry_location_problem(entry, open_dataset_storage(entry, settings, environ))
        except StorageError as error:
            log.warning("dataset %s: cannot check %s now (%s); discovery will try again", entry.id,
                        entry.location, error)
            continue
        if problem:
            problems.append(problem)
    return problems


def entry_location_problem(entry: DatasetEntry, storage: Storage) -> Problem | None:
    """The problem with ``entry``'s location as seen through ``storage``; raises ``StorageError`` when unknown."""
    why = storage.location_problem()
    if not why:
        return None
    field = "aws_data_prefix" if entry.type == "aws" else "instance_data_dir"
    return Problem(f"datasets[{entry.id}].{field}", entry.location, why)


def cache_location_problems(config: DatasetConfig, settings: DataSettings) -> list[Problem]:
    """One problem per local cache folder (``--cache_dir``, ``--cache_dir_vae``, ``--cache_dir_text``, a
    dataset's ``cache_dir_vae``, an embeds entry's ``cache_dir``) this process cannot write into.

    Caches are written after the model loaded; a read-only or foreign-owned folder must be named before.
    """
    from kubetuner_trainer.files import writable_problem

    folders: dict[str, str] = {}  # path -> the option that names it (the first one)
    for option, path in _cache_folders(config, settings):
        if path:
            folders.setdefault(path, option)
    problems = []
    for path, option in folders.items():
        why = writable_problem(path)
        if why:
            problems.append(Problem(option, path, why))
    return problems


def _cache_folders(config: DatasetConfig, settings: DataSettings) -> list[tuple[str, str | None]]:
    found: list[tuple[str, str | None]] = [("cache_dir", settings.cache_dir), ("cache_dir_vae", settings.cache_dir_vae),
                                           ("cache_dir_text", settings.cache_dir_text)]
    for entry in config.image_datasets + config.conditioning_datasets:
        if entry.type == "local":
            found.append((f"datasets[{entry.id}].cache_dir_vae", entry.cache_dir_vae))
        for ref in (config.text_embeds_for(entry), config.image_embeds_for(entry)):
            if ref is not None and ref.type == "local":
                found.append((f"datasets[{ref.id}].cache_dir", ref.cache_dir))
    return found
