"""The data pipeline's entry point: ``build_training_data(cfg, encoders) -> TrainingData``.

Building discovers and buckets every dataset, fills the text-embedding cache and (unless
``--vae_cache_ondemand``) this rank's share of the latent cache. Iterating yields ``Batch`` objects
forever, epoch after epoch; ``state_dict``/``load_state_dict`` resume at the exact next batch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from kubetuner_trainer.config.errors import MISSING, Problem

from .batch import Batch
from .buckets import SamplePlan
from .cache import MISSING_FILE, CacheEntry, Encoders, LatentCache, TextEmbedCache, stack_entries
from .conditioning import ConditioningSet, choose_slot, conditioning_sets, sample_context
from .dataset_config import DatasetConfig, DatasetConfigError, DatasetEntry, load_dataset_config
from .debug_logging import apply_debug_logging, log_batch, log_bucket_decisions, log_sampler_statistics
from .evaluation import EvalDataset, EvalSource, eval_dataset_ids, held_out_ids
from .images import load_pixels
from .prefetch import Prefetcher
from .prepare import (
    DataError,
    PreparedDataset,
    drop_unusable,
    metadata_storage,
    open_dataset_storage,
    prepare_all,
)
from .sampler import DatasetSamples, Sampler, ScheduledBatch
from .settings import DataSettings, settings_from_config
from .storage import LocalStorage, Storage

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class _Conditioning:
    """A conditioning dataset linked to a training dataset, with its latent cache."""

    set: ConditioningSet
    latents: LatentCache

    @property
    def id(self) -> str:
        return self.set.entry.id


@dataclass
class _ConditioningBatch:
    latents: list[torch.Tensor]  # per slot [B, C, h, w]
    pixels: list[torch.Tensor] | None  # per slot [B, 3, H, W]
    paths: list[list[str]]  # [slot][sample]
    contexts: list[str]  # per sample: the text-cache context of its conditioning images
    images: list[Callable[[], list[torch.Tensor]]]  # per sample: loads its conditioning pixels (one per slot)
    conditioning_type: str


@dataclass
class _Dataset:
    prepared: PreparedDataset
    latents: LatentCache
    text: TextEmbedCache
    conditioning: list[_Conditioning] = field(default_factory=list)

    @property
    def entry(self) -> DatasetEntry:
        return self.prepared.entry


def _cache_storage(entry: DatasetEntry, ref: DatasetEntry | None, explicit: str | None, default_root: str,
                   settings: DataSettings, environ: Mapping[str, str], subfolder: str) -> Storage:
    if ref is not None:  # an image_embeds / text_embeds entry names where the cache lives
        if ref.type == "aws":
            base = (ref.cache_dir or ref.aws_data_prefix or "").strip("/")
            return open_dataset_storage(ref, settings, environ, prefix=f"{base}/{subfolder}".strip("/"))
        return LocalStorage(os.path.join(ref.cache_dir or default_root, subfolder))
    if explicit:
        if entry.type == "aws":
            return open_dataset_storage(entry, settings, environ, prefix=explicit)
        return LocalStorage(explicit)
    return LocalStorage(os.path.join(default_root, subfolder))


def _text_storage(config: DatasetConfig, entry: DatasetEntry, settings: DataSettings,
                  environ: Mapping[str, str]) -> tuple[str, Storage]:
    """(cache identity, storage) of the text-embedding cache ``entry`` uses."""
    ref = config.text_embeds_for(entry)
    root = settings.cache_dir_text or os.path.join(settings.cache_root, "text")
    if ref is None:
        return "", LocalStorage(root)
    return ref.id, _cache_storage(entry, ref, None, root, settings, environ, "")


class TrainingData:
    """Batches for one rank. Iterate for ``Batch`` objects (endless; see ``epoch``)."""

    def __init__(self, datasets: list[_Dataset], encoders: Encoders,
                 settings: DataSettings, *, rank: int, world_size: int):
        self.datasets = datasets
        self.encoders = encoders
        self.settings = settings
        self.rank = rank
        self.world_size = world_size
        self.sampler = Sampler(
            [DatasetSamples(d.entry.id, d.prepared.buckets.buckets, d.prepared.buckets.repeats,
                            d.entry.probability, d.entry.is_regularisation_data) for d in datasets],
            batch_size=settings.train_batch_size, world_size=world_size, rank=rank, seed=settings.seed,
            sampling=settings.data_backend_sampling, fill_small_buckets=settings.disable_bucket_pruning)
        self.data_wait_seconds = 0.0
        self._consumed = (0, 0)  # (epoch, position) of the next batch the consumer will get
        self._prefetcher: Prefetcher[Batch] | None = None
        self._bad: set[str] = set()  # samples found unusable while training (left in the schedule)
        # the held-out evaluation datasets (--eval_dataset_id), never part of the sampler above
        self.eval_source: EvalSource | None = None

    # -- public API -------------------------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        """Micro-batches this rank gets per epoch (divide by gradient accumulation for optimizer steps)."""
        return self.sampler.steps_per_epoch

    @property
    def epoch(self) -> int:
        return self._consumed[0]

    @property
    def sample_count(self) -> int:
        return sum(d.prepared.buckets.sample_count for d in self.datasets)

    def state_dict(self) -> dict[str, Any]:
        epoch, position = self._consumed
        return {"epoch": epoch, "position": position, "fingerprint": self.sampler.fingerprint()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.close()
        self.sampler.load_state_dict(dict(state))
        self._consumed = (self.sampler.epoch, self.sampler.position)

    def __iter__(self) -> Iterator[Batch]:
        self.close()
        self.sampler.epoch, self.sampler.position = self._consumed
        source = (self._assemble(s) for s in self.sampler)
        if self.settings.dataloader_prefetch:
            self._prefetcher = Prefetcher(source, self.settings.dataloader_prefetch_qlen, on_wait=self._waited)
            source = self._prefetcher
            for batch in source:
                self._advance(batch)
                yield batch
        else:
            while True:
                started = time.perf_counter()
                batch = next(source)
                self._waited(time.perf_counter() - started)
                self._advance(batch)
                yield batch

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    # -- internals --------------------------------------------------------------------------------
    def _waited(self, seconds: float) -> None:
        self.data_wait_seconds += seconds

    def _advance(self, batch: Batch) -> None:
        epoch, position = batch.epoch, batch.position + 1
        if position >= len(self.sampler.schedule(epoch)):
            epoch, position = epoch + 1, 0
        self._consumed = (epoch, position)

    def _caption(self, scheduled: ScheduledBatch, index: int, caption: str) -> str:
        p = self.settings.caption_dropout_probability
        if p <= 0:
            return caption
        digest = hashlib.sha256(
            f"{self.settings.seed}\0dropout\0{scheduled.epoch}\0{scheduled.position}\0{self.rank}\0{index}".encode()
        ).digest()
        return "" if random.Random(int.from_bytes(digest[:8], "big")).random() < p else caption

    def _latents(self, dataset: _Dataset, plans: tuple[SamplePlan, ...],
                 ) -> tuple[list[SamplePlan], list[CacheEntry]]:
        """Latents for ``plans``; an unusable sample is swapped for another of its bucket (plan and all)."""
        out: dict[str, CacheEntry] = {}
        missing = []
        for plan in plans:
            latents = None if plan.key in self._bad else dataset.latents.load(plan)
            if latents is None:
                missing.append(plan)
            else:
                out[plan.key] = latents
        failed: list[tuple[str, str]] = []
        todo = [p for p in missing if p.key not in self._bad]
        if todo:
            encoded, failed = dataset.latents.encode(todo, dataset.prepared.storage, self.encoders)
            out.update(encoded)
            gone = [k for k, why in failed if why == MISSING_FILE]
            if gone and not self.settings.ignore_missing_files:
                raise DataError(f"dataset {dataset.entry.id}: files disappeared: {', '.join(gone)}; restore them, "
                                "or set --ignore_missing_files to train on the rest")
            for key, why in failed:
                log.warning("dataset %s: %s is unusable (%s); a sample of the same bucket takes its place",
                            dataset.entry.id, key, why)
                self._bad.add(key)
        chosen = []
        for plan in plans:
            if plan.key in out:
                chosen.append(plan)
            else:
                substitute, latents = self._substitute(dataset, plan)
                out[substitute.key] = latents
                chosen.append(substitute)
        return chosen, [out[p.key] for p in chosen]

    def _substitute(self, dataset: _Dataset, bad: SamplePlan) -> tuple[SamplePlan, CacheEntry]:
        """The next usable sample after ``bad`` in its bucket (deterministic, so every run agrees)."""
        bucket = dataset.prepared.buckets.buckets[bad.bucket]
        start = next((i for i, p in enumerate(bucket) if p.key == bad.key), 0)
        for offset in range(1, len(bucket) + 1):
            candidate = bucket[(start + offset) % len(bucket)]
            if candidate.key in self._bad:
                continue
            latents = dataset.latents.load(candidate)
            if latents is None:
                encoded, failed = dataset.latents.encode([candidate], dataset.prepared.storage, self.encoders)
                latents = encoded.get(candidate.key)
                self._bad.update(k for k, _ in failed)
            if latents is not None:
                return candidate, latents
        raise DataError(f"dataset {dataset.entry.id}: no readable sample left in the bucket of {bad.key}")

    def _slots(self, dataset: _Dataset, epoch: int, key: str) -> list[_Conditioning]:
        """The conditioning datasets feeding sample ``key``: all (``combined``) or one seeded draw (``random``)."""
        links = dataset.conditioning
        if self.settings.conditioning_multidataset_sampling == "random" and len(links) > 1:
            return [links[choose_slot(self.settings.seed, epoch, key, len(links))]]
        return list(links)

    def _conditioning(self, dataset: _Dataset, epoch: int, plans: list[SamplePlan]) -> _ConditioningBatch:
        """The conditioning latents (and pixels when the family asks) of ``plans``, slot by slot."""
        chosen = [self._slots(dataset, epoch, p.key) for p in plans]
        slots = len(chosen[0])
        latents: list[list[torch.Tensor]] = [[] for _ in range(slots)]
        paths: list[list[str]] = [[] for _ in range(slots)]
        want_pixels = bool(getattr(self.encoders, "conditioning_needs_pixels", False))
        pixels: list[list[torch.Tensor]] = [[] for _ in range(slots)]
        contexts, loaders = [], []
        for plan, links in zip(plans, chosen, strict=True):
            for slot, link in enumerate(links):
                cplan = link.set.plans[plan.key]
                latents[slot].append(_conditioning_latents(link, cplan, self.encoders))
                paths[slot].append(f"{link.set.storage.describe().rstrip('/')}/{cplan.key}")
                if want_pixels:
                    pixels[slot].append(load_pixels(link.set.storage, cplan))
            contexts.append(_context(links, plan.key))
            loaders.append(_pixel_loader(links, plan.key))
        stacked = [torch.stack(slot) for slot in latents]
        return _ConditioningBatch(stacked, [torch.stack(p) for p in pixels] if want_pixels else None, paths,
                                  contexts, loaders, dataset.conditioning[0].set.conditioning_type)

    def _assemble(self, scheduled: ScheduledBatch) -> Batch:
        dataset = self.datasets[scheduled.dataset_index]
        plans, entries = self._latents(dataset, scheduled.plans)
        latents, conditioning = stack_entries(entries)
        captions = [self._caption(scheduled, i, dataset.prepared.captions[p.key]) for i, p in enumerate(plans)]
        cond = self._conditioning(dataset, scheduled.epoch, plans) if dataset.conditioning else None
        if cond is not None and getattr(self.encoders, "text_uses_conditioning_images", False):
            embeds = [dataset.text.get(c, self.encoders, context=ctx, images=load)
                      for c, ctx, load in zip(captions, cond.contexts, cond.images, strict=True)]
        else:
            embeds = [dataset.text.get(c, self.encoders) for c in captions]
        text = {key: _stack_padded([e[key] for e in embeds]) for key in embeds[0]}
        location = dataset.prepared.storage.describe().rstrip("/")
        log_batch(dataset.entry.id, scheduled.epoch, scheduled.position, [p.key for p in plans], plans[0].target_size)
        return Batch(
            latents=latents,
            cached_conditioning=conditioning,
            text=text,
            original_sizes=[(p.original_size[1], p.original_size[0]) for p in plans],
            crop_coords=[p.crop_coords for p in plans],
            target_sizes=[(p.target_size[1], p.target_size[0]) for p in plans],
            captions=captions,
            paths=[f"{location}/{p.key}" for p in plans],
            dataset_ids=[dataset.entry.id] * len(plans),
            is_regularisation=[dataset.entry.is_regularisation_data] * len(plans),
            is_i2v=dataset.entry.video.is_i2v if dataset.entry.video is not None else None,
            conditioning_latents=cond.latents if cond else None,
            conditioning_pixels=cond.pixels if cond else None,
            conditioning_paths=cond.paths if cond else None,
            conditioning_type=cond.conditioning_type if cond else None,
            epoch=scheduled.epoch,
            position=scheduled.position,
        )


def _stack_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack per-sample tensors; when their first (token) axis differs, pad it with zeros to the longest.

    Prompts encoded with their conditioning images (``text_uses_conditioning_images``) hold the images' tokens,
    so their length varies with the image size; a zero-padded attention mask marks the padding as unused.
    """
    longest = max(t.shape[0] for t in tensors) if tensors[0].dim() else 0
    if all(t.shape == tensors[0].shape for t in tensors) or not longest:
        return torch.stack(tensors)
    padded = [torch.cat([t, t.new_zeros((longest - t.shape[0], *t.shape[1:]))]) for t in tensors]
    return torch.stack(padded)


def _conditioning_latents(link: _Conditioning, plan: SamplePlan, encoders: Encoders) -> torch.Tensor:
    entry = link.latents.load(plan)
    if entry is None:
        encoded, failed = link.latents.encode([plan], link.set.storage, encoders)
        if failed:
            raise DataError(f"dataset {link.id}: conditioning image {plan.key} cannot be used: {failed[0][1]}")
        entry = encoded[plan.key]
    return entry["latents"] if isinstance(entry, dict) else entry  # a family's extra tensors are the target's


def _context(links: list[_Conditioning], key: str) -> str:
    return "+".join(sample_context(link.id, link.set.plans[key]) for link in links)


def _pixel_loader(links: list[_Conditioning], key: str) -> Callable[[], list[torch.Tensor]]:
    return lambda: [load_pixels(link.set.storage, link.set.plans[key]) for link in links]


def _link_conditioning(config: DatasetConfig, datasets: list[_Dataset], settings: DataSettings,
                       encoders: Encoders, environ: Mapping[str, str]) -> None:
    """Pair every training dataset with its conditioning datasets and open their latent caches."""
    vae_root = settings.cache_dir_vae or os.path.join(settings.cache_root, "vae")
    store = metadata_storage(settings)
    for dataset in datasets:
        if not config.conditioning_for(dataset.entry):
            continue
        plans = [p for ps in dataset.prepared.buckets.buckets.values() for p in ps]
        for found in conditioning_sets(config, dataset.entry, plans, dataset.prepared.storage, settings,
                                       environ=environ, metadata_store=store):
            storage = _cache_storage(found.entry, None, found.entry.cache_dir_vae, vae_root, settings, environ,
                                     found.entry.id)
            cache = LatentCache(storage, model_key=encoders.cache_key, latent_downscale=encoders.latent_downscale,
                                compress=settings.compress_disk_cache, namespace=f"conditioning:{found.entry.id}")
            dataset.conditioning.append(_Conditioning(found, cache))


def _context_combinations(dataset: _Dataset, settings: DataSettings) -> list[list[_Conditioning]]:
    links = dataset.conditioning
    if settings.conditioning_multidataset_sampling == "random" and len(links) > 1:
        return [[link] for link in links]
    return [list(links)]


def _build_image_text(dataset: _Dataset, settings: DataSettings, encoders: Encoders, rank: int,
                      world_size: int) -> None:
    """Text embeddings keyed on (caption, conditioning images) for families that encode prompts with them."""
    plans = sorted((p for ps in dataset.prepared.buckets.buckets.values() for p in ps), key=lambda p: p.key)
    items = []
    for plan in plans[rank::world_size]:
        caption = dataset.prepared.captions[plan.key]
        for links in _context_combinations(dataset, settings):
            context, loader = _context(links, plan.key), _pixel_loader(links, plan.key)
            items.append((caption, context, loader))
            if settings.caption_dropout_probability > 0:
                items.append(("", context, loader))
    dataset.text.build_with_images(items, encoders)


def build_training_data(cfg: Any, encoders: Encoders, *, rank: int = 0, world_size: int = 1,
                        environ: Mapping[str, str] | None = None, progress: Progress | None = None) -> TrainingData:
    """Prepare every dataset and the caches, and return this rank's batch source."""
    environ = os.environ if environ is None else environ
    settings = settings_from_config(cfg)
    settings = replace(settings, num_processes=world_size)
    apply_debug_logging(settings)
    if not settings.data_backend_config:
        raise DatasetConfigError([Problem("data_backend_config", MISSING,
                                          "is not set: point it at the dataset list (multidatabackend.json)")])
    config = load_dataset_config(settings.data_backend_config, settings)
    eval_ids, eval_problems = eval_dataset_ids(cfg, config)
    if eval_problems:
        raise DatasetConfigError(eval_problems)
    held_out = held_out_ids(config, eval_ids)
    linked = [i for i in eval_ids if config.by_id(i).conditioning_data]
    if linked:  # EvalSource batches carry no conditioning inputs yet
        raise DatasetConfigError([Problem("eval_dataset_id", linked[0], "links conditioning_data; the evaluation "
                                          "loss with conditioning inputs is not supported yet by this trainer")])
    prepared = prepare_all(config, settings, environ=environ,
                           progress=(lambda i, d, t: progress(f"discover:{i}", d, t)) if progress else None)
    log_bucket_decisions(prepared)
    empty = [p.entry.id for p in prepared if not p.buckets.buckets]
    if empty:  # permanent: retrying cannot produce images, so it is a configuration error (exit 78)
        raise DatasetConfigError([Problem("data_backend_config", settings.data_backend_config,
                                          _empty_message(empty, prepared, settings))])

    text_caches: dict[str, TextEmbedCache] = {}
    datasets = []
    for item in prepared:
        entry = item.entry
        vae_root = settings.cache_dir_vae or os.path.join(settings.cache_root, "vae")  # one folder per dataset
        storage = _cache_storage(entry, config.image_embeds_for(entry), entry.cache_dir_vae, vae_root, settings,
                                 environ, entry.id)
        cache = LatentCache(storage, model_key=encoders.cache_key, latent_downscale=encoders.latent_downscale,
                            compress=settings.compress_disk_cache)
        text_id, text_storage = _text_storage(config, entry, settings, environ)
        if text_id not in text_caches:
            text_caches[text_id] = TextEmbedCache(text_storage, model_key=encoders.cache_key,
                                                  compress=settings.compress_disk_cache)
        datasets.append(_Dataset(item, cache, text_caches[text_id]))
        if entry.scan_for_errors:
            _scan(datasets[-1], settings)
    _link_conditioning(config, datasets, settings, encoders, environ)

    if not settings.skips("text"):
        for dataset in datasets:
            if dataset.conditioning and getattr(encoders, "text_uses_conditioning_images", False):
                _build_image_text(dataset, settings, encoders, rank, world_size)
        for text_cache in text_caches.values():
            # prompts encoded with their images are built above; the caption alone would never be read
            users = [d for d in datasets if d.text is text_cache and not (
                d.conditioning and getattr(encoders, "text_uses_conditioning_images", False))]
            if not users:
                continue
            captions = sorted({""} | {c for d in users for c in d.prepared.captions.values()})
            # each rank encodes its share; a caption another rank has not written yet is encoded on use
            text_cache.build(captions[rank::world_size], encoders)
    if not settings.vae_cache_ondemand and not settings.skips("vae"):
        for dataset in datasets:
            _build_latents(dataset, settings, encoders, rank, world_size, progress)
            for link in dataset.conditioning:
                _build_conditioning_latents(dataset, link, settings, encoders, rank, world_size, progress)
    data = TrainingData([d for d in datasets if d.entry.id not in held_out], encoders, settings, rank=rank,
                        world_size=world_size)
    if eval_ids:
        data.eval_source = EvalSource([_eval_dataset(d) for d in datasets if d.entry.id in eval_ids], encoders,
                                      batch_size=settings.train_batch_size, rank=rank, world_size=world_size)
    if settings.print_sampler_statistics:
        log_sampler_statistics(data.sampler, data.epoch)
    if data.steps_per_epoch == 0:
        raise DatasetConfigError([Problem(
            "train_batch_size", settings.train_batch_size,
            f"no full batch of {settings.train_batch_size} x {world_size} processes can be formed from the "
            "datasets; add images, lower --train_batch_size, or set --disable_bucket_pruning")])
    return data


def _eval_dataset(dataset: _Dataset) -> EvalDataset:
    plans = [p for ps in dataset.prepared.buckets.buckets.values() for p in ps]
    return EvalDataset(id=dataset.entry.id, plans=plans, captions=dict(dataset.prepared.captions),
                       latents=dataset.latents, text=dataset.text, storage=dataset.prepared.storage,
                       location=dataset.prepared.storage.describe().rstrip("/"))


def _scan(dataset: _Dataset, settings: DataSettings) -> None:
    plans = [p for ps in dataset.prepared.buckets.buckets.values() for p in ps]
    report = dataset.latents.scan(plans, settings.vae_cache_scan_behaviour)
    if report.removed:
        log.warning("dataset %s: removed %d corrupt or outdated latent cache entries", dataset.entry.id,
                    len(report.removed))
    if report.adopted:
        buckets = dataset.prepared.buckets.buckets
        for size in list(buckets):
            buckets[size] = [report.adopted.get(p.key, p) if p.key in report.adopted else p for p in buckets[size]]
        moved: dict[tuple[int, ...], list[SamplePlan]] = {}
        for plan in (p for ps in buckets.values() for p in ps):
            moved.setdefault(plan.bucket, []).append(plan)
        dataset.prepared.buckets.buckets = {s: sorted(v, key=lambda p: p.key) for s, v in sorted(moved.items())}
        log.warning("dataset %s: %d samples follow the sizes of their existing cache entries (sync)",
                    dataset.entry.id, len(report.adopted))


def _build_latents(dataset: _Dataset, settings: DataSettings, encoders: Encoders, rank: int, world_size: int,
                   progress: Progress | None) -> None:
    plans = sorted((p for ps in dataset.prepared.buckets.buckets.values() for p in ps), key=lambda p: p.key)
    own = plans[rank::world_size]  # other ranks build theirs; a missing entry is encoded on demand
    report = dataset.latents.build(
        own, dataset.prepared.storage, encoders, batch_size=settings.vae_batch_size, workers=settings.max_workers,
        write_batch=settings.write_batch_size,
        progress=(lambda d, t: progress(f"vae:{dataset.entry.id}", d, t)) if progress else None)
    for key, reason in report.failed:
        log.warning("dataset %s: leaving out %s: %s", dataset.entry.id, key, reason)
        if settings.delete_problematic_images and reason != MISSING_FILE:
            dataset.prepared.storage.delete(key)
    # With several ranks every rank must keep the same schedule, so bad samples stay in the buckets
    # and are replaced when their batch comes; a single process simply leaves them out.
    if report.failed and world_size == 1:
        drop_unusable(dataset.prepared, list(report.failed), settings)


def _build_conditioning_latents(dataset: _Dataset, link: _Conditioning, settings: DataSettings, encoders: Encoders,
                                rank: int, world_size: int, progress: Progress | None) -> None:
    """This rank's share of a conditioning dataset's latents; a training sample whose conditioning image cannot
    be decoded is left out with it (a single process; several ranks fail on it when its batch comes)."""
    live = {p.key for ps in dataset.prepared.buckets.buckets.values() for p in ps}
    plans = sorted((p for k, p in link.set.plans.items() if k in live), key=lambda p: p.key)
    report = link.latents.build(
        plans[rank::world_size], link.set.storage, encoders, batch_size=settings.vae_batch_size,
        workers=settings.max_workers, write_batch=settings.write_batch_size,
        progress=(lambda d, t: progress(f"vae:{link.id}", d, t)) if progress else None)
    failed = [(key, f"its conditioning image in {link.id} is unusable: {why}") for key, why in report.failed]
    for key, reason in failed:
        log.warning("dataset %s: leaving out %s: %s", dataset.entry.id, key, reason)
    if failed and world_size == 1:
        drop_unusable(dataset.prepared, failed, settings)


def _empty_message(empty: list[str], prepared: list[PreparedDataset], settings: DataSettings) -> str:
    lines = []
    for item in prepared:
        if item.entry.id not in empty:
            continue
        reasons: dict[str, int] = {}
        for _, why in item.skipped:
            reasons[why.split(" (")[0]] = reasons.get(why.split(" (")[0], 0) + 1
        top = "; ".join(f"{n} x {why}" for why, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:3])
        lines.append(f"dataset {item.entry.id} ({item.entry.location}): {len(item.discovery.images)} images found, "
                     f"none usable{': ' + top if top else ''}")
    return ("no training samples left; run `kubetuner data inspect` for details:\n  " + "\n  ".join(lines)
            + f"\n(effective batch {settings.effective_batch_size})")
