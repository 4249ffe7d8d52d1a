"""VAE-latent and text-embedding caches.

Each entry is a safetensors blob (optionally gzip-compressed) whose name carries a fingerprint of
everything that shapes it: the model's ``cache_key``, the source file's version and the sample geometry
(target size, resize, crop). A change of model, resolution or crop therefore never finds a stale entry;
the stored fingerprint is checked again on load. Entries are written atomically (see ``storage``), and a
blob that fails to decode is treated as missing and recomputed, never trusted.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import posixpath
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .buckets import SamplePlan
from .images import load_pixels
from .metadata import UnreadableImage
from .storage import LocalStorage, Storage

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
MISSING_FILE = "file is missing"
GZ_SUFFIX = ".safetensors.gz"


class Encoders(Protocol):
    """What the data pipeline needs from a model family (see docs/ARCHITECTURE.md)."""

    cache_key: str
    latent_downscale: int

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]: ...

    def encode_prompts(self, prompts: list[str]) -> list[dict[str, torch.Tensor]]: ...


#: one sample's cached latents ``[C, ...]``, or a dict of them with the tensors that condition the denoiser
#: (``{"latents": ..., "<name>": ...}``, for a family whose encoder returns a dict, e.g. Wan image-to-video)
CacheEntry = torch.Tensor | dict[str, torch.Tensor]


def split_encoded(encoded: torch.Tensor | dict[str, torch.Tensor], count: int) -> list[CacheEntry]:
    """A batch encoder output (``[B, ...]`` or a dict of ``[B, ...]`` tensors) → one cache entry per sample."""
    if isinstance(encoded, dict):
        return [{name: tensor[i] for name, tensor in encoded.items()} for i in range(count)]
    return [encoded[i] for i in range(count)]


def stack_entries(entries: Sequence[CacheEntry]) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """Cache entries of one batch → (latents ``[B, ...]``, the other tensors stacked per name, or None)."""
    if isinstance(entries[0], dict):
        names = [name for name in entries[0] if name != "latents"]
        return (torch.stack([e["latents"] for e in entries]),
                {name: torch.stack([e[name] for e in entries]) for name in names})
    return torch.stack(list(entries)), None


class CacheEntryError(ValueError):
    """A cache blob is corrupt or belongs to something else."""


def pack(tensors: dict[str, torch.Tensor], meta: dict[str, str], compress: bool) -> bytes:
    blob = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=meta)
    return gzip.compress(blob, compresslevel=3) if compress else blob


def unpack(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Decode a blob; ``CacheEntryError`` when it is truncated or not a cache entry."""
    try:
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        (header_len,) = struct.unpack("<Q", data[:8])
        if header_len <= 0 or 8 + header_len > len(data):
            raise ValueError("header length beyond the end of the blob")
        header = json.loads(data[8:8 + header_len])
        meta = header.get("__metadata__", {}) or {}
        tensors = st_load(data)
    except Exception as error:
        raise CacheEntryError(f"corrupt cache entry ({error.__class__.__name__}: {error})") from None
    return tensors, meta


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class BuildReport:
    encoded: int = 0
    reused: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image key, reason)


@dataclass
class ScanReport:
    checked: int = 0
    removed: list[str] = field(default_factory=list)  # cache keys deleted (corrupt or stale)
    adopted: dict[str, SamplePlan] = field(default_factory=dict)  # sync: image key -> plan of its entry


class LatentCache:
    """VAE latents of one dataset, stored under ``storage`` (a folder or S3 prefix)."""

    def __init__(self, storage: Storage, *, model_key: str, latent_downscale: int, compress: bool = False,
                 namespace: str = ""):
        self.storage = storage
        self.model_key = model_key
        #: a conditioning dataset's latents name it here, so their entries never match a target's
        self.namespace = namespace
        self.latent_downscale = latent_downscale
        self.compress = compress
        self._index: set[str] | None = None
        self._lock = threading.RLock()

    def fingerprint(self, plan: SamplePlan) -> str:
        payload = {"model": self.model_key, "source": plan.key, "version": plan.version,
                   "geometry": plan.geometry(), "downscale": self.latent_downscale}
        if self.namespace:  # unset: the fingerprints of caches written before namespaces existed
            payload["namespace"] = self.namespace
        return _digest(payload)

    def entry_key(self, plan: SamplePlan) -> str:
        stem = posixpath.splitext(plan.key)[0]
        return f"{stem}-{self.fingerprint(plan)[:20]}{GZ_SUFFIX if self.compress else SUFFIX}"

    def index(self, refresh: bool = False) -> set[str]:
        """Names of the stored entries (one listing, then kept up to date by this process)."""
        with self._lock:
            if self._index is None or refresh:
                self._index = {o.key for o in self.storage.list() if o.key.endswith((SUFFIX, GZ_SUFFIX))}
            return self._index

    def has(self, plan: SamplePlan) -> bool:
        return self.entry_key(plan) in self.index()

    def missing(self, plans: Iterable[SamplePlan]) -> list[SamplePlan]:
        index = self.index()
        return [p for p in plans if self.entry_key(p) not in index]

    def expected_shape(self, plan: SamplePlan) -> tuple[int, int]:
        width, height = plan.target_size
        return height // self.latent_downscale, width // self.latent_downscale

    def load(self, plan: SamplePlan) -> CacheEntry | None:
        """The cached latents of ``plan`` (a :data:`CacheEntry`); None when missing, stale or corrupt (then
        recompute)."""
        key = self.entry_key(plan)
        try:
            data = self.storage.read(key)
        except FileNotFoundError:
            self._forget(key)
            return None
        try:
            tensors, meta = unpack(data)
            self._verify(plan, tensors, meta)
        except CacheEntryError as error:
            log.warning("latent cache entry %s is unusable (%s); it will be recomputed", key, error)
            self._forget(key)
            return None
        return tensors["latents"] if len(tensors) == 1 else tensors

    def _verify(self, plan: SamplePlan, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        if meta.get("fingerprint") != self.fingerprint(plan):
            raise CacheEntryError("fingerprint does not match this model/sample")
        latents = tensors.get("latents")
        if latents is None or tuple(latents.shape[-2:]) != self.expected_shape(plan):
            got = None if latents is None else tuple(latents.shape)
            raise CacheEntryError(f"latent shape {got} does not fit target {plan.target_size}")

    def _forget(self, key: str) -> None:
        with self._lock:
            if self._index is not None:
                self._index.discard(key)

    def blob(self, plan: SamplePlan, entry: CacheEntry) -> tuple[str, bytes]:
        meta = {"fingerprint": self.fingerprint(plan), "model": self.model_key, "source": plan.key,
                "version": plan.version, "geometry": json.dumps(plan.geometry())}
        tensors = entry if isinstance(entry, dict) else {"latents": entry}
        return self.entry_key(plan), pack(tensors, meta, self.compress)

    def store(self, items: Sequence[tuple[str, bytes]]) -> None:
        self.storage.write_many(items)
        with self._lock:
            if self._index is not None:
                self._index.update(k for k, _ in items)

    def encode(self, plans: Sequence[SamplePlan], source: Storage, encoders: Encoders,
               ) -> tuple[dict[str, CacheEntry], list[tuple[str, str]]]:
        """Encode ``plans`` (all of one target size) now; returns the entries per key and failures."""
        pixels, keys, failed = [], [], []
        for plan in plans:
            try:
                pixels.append(load_pixels(source, plan))
                keys.append(plan)
            except FileNotFoundError:
                failed.append((plan.key, MISSING_FILE))
            except (UnreadableImage, OSError) as error:
                failed.append((plan.key, str(error)))
        if not pixels:
            return {}, failed
        with torch.no_grad():
            entries = split_encoded(encoders.encode_images(torch.stack(pixels)), len(keys))
        self.store([self.blob(plan, entries[i]) for i, plan in enumerate(keys)])
        return {plan.key: entries[i] for i, plan in enumerate(keys)}, failed

    def build(self, plans: Sequence[SamplePlan], source: Storage, encoders: Encoders, *, batch_size: int = 4,
              workers: int = 8, write_batch: int = 64,
              progress: Callable[[int, int], None] | None = None) -> BuildReport:
        """Compute every missing entry: parallel reads ahead, batched encoding, batched writes."""
        report = BuildReport()
        if isinstance(self.storage, LocalStorage):
            self.storage.remove_stale_temps()
        todo = self.missing(plans)
        report.reused = len(plans) - len(todo)
        if not todo:
            return report
        groups: dict[tuple[int, ...], list[SamplePlan]] = {}
        for plan in todo:
            groups.setdefault(plan.bucket, []).append(plan)
        batches = [group[i:i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]
        pending_writes: list[tuple[str, bytes]] = []
        writes: list[Future[None]] = []
        done = 0

        def read(plan: SamplePlan) -> torch.Tensor | Exception:
            try:
                return load_pixels(source, plan)
            except (UnreadableImage, FileNotFoundError, OSError) as error:
                return error

        with ThreadPoolExecutor(max_workers=max(1, workers)) as readers, \
                ThreadPoolExecutor(max_workers=2) as writer:
            ahead = max(2, workers // max(1, batch_size) + 1)
            futures: list[list[Future[torch.Tensor | Exception]]] = []
            for index, batch in enumerate(batches):
                while len(futures) <= min(index + ahead, len(batches) - 1):
                    futures.append([readers.submit(read, p) for p in batches[len(futures)]])
                loaded = [f.result() for f in futures[index]]
                futures[index] = []
                good = [(p, x) for p, x in zip(batch, loaded, strict=True) if isinstance(x, torch.Tensor)]
                for plan, result in zip(batch, loaded, strict=True):
                    if not isinstance(result, torch.Tensor):
                        reason = MISSING_FILE if isinstance(result, FileNotFoundError) else str(result)
                        report.failed.append((plan.key, reason))
                if good:
                    with torch.no_grad():
                        entries = split_encoded(encoders.encode_images(torch.stack([x for _, x in good])), len(good))
                    pending_writes.extend(self.blob(p, entries[i]) for i, (p, _) in enumerate(good))
                    report.encoded += len(good)
                if len(pending_writes) >= write_batch or index == len(batches) - 1:
                    writes.append(writer.submit(self.store, pending_writes))
                    pending_writes = []
                done += len(batch)
                if progress:
                    progress(done, len(todo))
            for future in writes:
                future.result()
        return report

    def scan(self, plans: Sequence[SamplePlan], behaviour: str = "recreate") -> ScanReport:
        """Check every entry of ``plans``: corrupt ones are deleted (so they get rebuilt).

        Entries left by an earlier geometry (same image, same model, other size/crop) are deleted with
        ``recreate``; with ``sync`` the sample adopts the geometry its entry was made for instead.
        """
        report = ScanReport()
        index = self.index(refresh=True)
        by_stem: dict[str, list[str]] = {}
        for name in index:
            stem = name.rsplit("-", 1)[0]
            by_stem.setdefault(stem, []).append(name)
        for plan in plans:
            own = self.entry_key(plan)
            stem = posixpath.splitext(plan.key)[0]
            if own in index:
                report.checked += 1
                if self.load(plan) is None:
                    self.storage.delete(own)
                    report.removed.append(own)
            others = [n for n in by_stem.get(stem, ()) if n != own]
            for name in others:
                adopted = self._adoptable(plan, name) if behaviour == "sync" and own not in self.index() else None
                if adopted is not None:
                    report.adopted[plan.key] = adopted
                    continue
                self.storage.delete(name)
                self._forget(name)
                report.removed.append(name)
        return report

    def _adoptable(self, plan: SamplePlan, name: str) -> SamplePlan | None:
        try:
            tensors, meta = unpack(self.storage.read(name))
            geometry = json.loads(meta.get("geometry", "{}"))
            candidate = replace(plan, intermediate_size=tuple(geometry["intermediate"]),
                                crop_left=geometry["crop"][0], crop_top=geometry["crop"][1],
                                target_size=tuple(geometry["target"]))
            self._verify(candidate, tensors, meta)
        except (CacheEntryError, KeyError, ValueError, TypeError, FileNotFoundError):
            return None
        return candidate


class TextEmbedCache:
    """Prompt embeddings, content-addressed by (model, caption); shared by datasets."""

    def __init__(self, storage: Storage, *, model_key: str, compress: bool = False, memory_items: int = 256):
        self.storage = storage
        self.model_key = model_key
        self.compress = compress
        self._index: set[str] | None = None
        self._memory: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._memory_items = memory_items
        self._lock = threading.RLock()

    def entry_key(self, caption: str, context: str = "") -> str:
        """The entry's name: a hash of (model, caption) and, for image-conditioned prompts, the ``context``
        (a digest of the conditioning images, see ``data/conditioning.py``)."""
        text = f"{self.model_key}\0{caption}" + (f"\0{context}" if context else "")
        digest = hashlib.sha256(text.encode()).hexdigest()
        return f"{digest[:2]}/{digest}{GZ_SUFFIX if self.compress else SUFFIX}"

    def index(self) -> set[str]:
        with self._lock:
            if self._index is None:
                self._index = {o.key for o in self.storage.list() if o.key.endswith((SUFFIX, GZ_SUFFIX))}
            return self._index

    def build(self, captions: Iterable[str], encoders: Encoders, *, batch_size: int = 32) -> int:
        """Encode every caption not cached yet; returns how many were encoded."""
        index = self.index()
        todo = sorted({c for c in captions if self.entry_key(c) not in index})
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            self._encode_store(chunk, encoders)
        return len(todo)

    def _encode_store(self, captions: list[str], encoders: Encoders) -> list[dict[str, torch.Tensor]]:
        with torch.no_grad():
            embeds = encoders.encode_prompts(captions)
        items = []
        for caption, embed in zip(captions, embeds, strict=True):
            meta = {"model": self.model_key, "caption": caption}
            items.append((self.entry_key(caption), pack(embed, meta, self.compress)))
        self.storage.write_many(items)
        with self._lock:
            self.index().update(k for k, _ in items)
        return embeds

    def build_with_images(self, items: Iterable[tuple[str, str, Callable[[], list[torch.Tensor]]]],
                          encoders: Encoders) -> int:
        """Encode every (caption, context, conditioning-pixels loader) not cached yet, one prompt at a time,
        through ``encoders.encode_prompts_with_images``; returns how many were encoded."""
        index = self.index()
        count = 0
        for caption, context, images in items:
            if self.entry_key(caption, context) not in index:
                self._encode_store_with_images(caption, context, images(), encoders)
                count += 1
        return count

    def _encode_store_with_images(self, caption: str, context: str, images: list[torch.Tensor],
                                  encoders: Encoders) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            embed = encoders.encode_prompts_with_images([caption], [images])[0]  # type: ignore[attr-defined]
        key = self.entry_key(caption, context)
        self.storage.write_many([(key, pack(embed, {"model": self.model_key, "caption": caption, "context": context},
                                            self.compress))])
        with self._lock:
            self.index().add(key)
        return embed

    def get(self, caption: str, encoders: Encoders | None = None, *, context: str = "",
            images: Callable[[], list[torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
        """The embedding of ``caption`` (with ``context``: of the caption and its conditioning images, which
        ``images`` loads when it has to be encoded); encoded and stored now when missing or corrupt."""
        key = self.entry_key(caption, context)
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                return self._memory[key]
        embed: dict[str, torch.Tensor] | None = None
        try:
            tensors, meta = unpack(self.storage.read(key))
            if (meta.get("model") == self.model_key and meta.get("caption") == caption
                    and meta.get("context", "") == context):
                embed = tensors
            else:
                log.warning("text embedding %s belongs to another model/caption; recomputing", key)
        except FileNotFoundError:
            pass
        except CacheEntryError as error:
            log.warning("text embedding %s is unusable (%s); recomputing", key, error)
        if embed is None:
            if encoders is None:
                raise KeyError(f"no cached text embedding for caption {caption[:60]!r}")
            if context:
                if images is None:
                    raise KeyError(f"no cached text embedding for caption {caption[:60]!r} with its images")
                embed = self._encode_store_with_images(caption, context, images(), encoders)
            else:
                embed = self._encode_store([caption], encoders)[0]
        with self._lock:
            self._memory[key] = embed
            while len(self._memory) > self._memory_items:
                self._memory.popitem(last=False)
        return embed
