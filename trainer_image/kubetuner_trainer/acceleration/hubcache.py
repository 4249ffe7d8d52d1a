"""``--delete_model_after_load``: remove the base model's files from the Hugging Face cache once loaded.

Only a hub id's cached snapshot files are removed (a local folder is never touched); the folders a
later part of the run still reads are kept (``vae/`` while validation renders, the text encoders
and tokenizers when ``--fully_unload_text_encoder`` loads them again). A blob shared with a kept
file stays. Failures are logged and ignored: several machines may share one cache.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def kept_folders(cfg: Any, family: Any, *, validating: bool) -> set[str]:
    """The snapshot's top-level folders the rest of the run still loads from."""
    keep: set[str] = set()
    if validating:
        keep.add("vae")
    if getattr(cfg, "fully_unload_text_encoder", False):
        keep.update(family.text_encoder_names)
        keep.update(family.tokenizer_names)
    return keep


def delete_cached_model(repo_id: str, keep: Iterable[str] = (), cache_dir: str | Path | None = None) -> list[Path]:
    """Delete the cached files of the model ``repo_id`` except those under the top-level folders ``keep``.

    Returns the snapshot paths removed (empty when the model is not in the cache, e.g. a local folder).
    """
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return []
    keep = set(keep)
    removed: list[Path] = []
    for repo in info.repos:
        if repo.repo_type != "model" or repo.repo_id != repo_id:
            continue
        files = [(rev.snapshot_path, f) for rev in repo.revisions for f in rev.files]
        kept = [f for snap, f in files if f.file_path.relative_to(snap).parts[0] in keep]
        kept_blobs = {f.blob_path for f in kept}
        for _snapshot, f in files:
            if f in kept:
                continue
            try:
                f.file_path.unlink(missing_ok=True)
                if f.blob_path not in kept_blobs:
                    f.blob_path.unlink(missing_ok=True)
                removed.append(f.file_path)
            except OSError as exc:
                log.warning("delete_model_after_load: could not remove %s: %s", f.file_path, exc)
    if removed:
        log.info("delete_model_after_load: removed %d cached file(s) of %s (kept: %s)", len(removed), repo_id,
                 ", ".join(sorted(keep)) or "nothing")
    return removed
