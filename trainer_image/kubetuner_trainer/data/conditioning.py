"""Conditioning datasets: images paired with a training dataset's images (edit models, ControlNet-style inputs).

A training entry links its conditioning datasets with ``conditioning_data`` (one id or a list), or a
generated ``conditioning`` block (``data/generated.py``). Rules, as SimpleTuner 3.1.6 pairs them:

- **Pairing**: a conditioning file pairs with the training file of the same relative path (extension
  included) inside its dataset. A training sample whose pair is missing from a linked conditioning
  dataset is a configuration error (exit 78) naming that dataset and the first missing files
  (SimpleTuner fails too, when the batch is collated; this fails before anything is encoded).
  Conditioning files without a training file are ignored (``kubetuner data inspect`` counts them).
- **Geometry**: every ``conditioning_type`` except ``reference_loose`` takes the target's sample plan
  (resize to the same intermediate size, the same crop box, the same bucket), so the two are pixel-aligned
  and their latents have the same size; an unset ``conditioning_type`` behaves so too.
  ``reference_loose`` images are planned on their own (own aspect bucket at the conditioning entry's
  resolution and crop settings); with ``train_batch_size`` > 1 the pairs of one target bucket must then
  share one conditioning size (else exit 78).
- **Caches**: conditioning latents are encoded by the family's VAE like target latents, stored at the
  conditioning entry's ``cache_dir_vae`` (else ``{cache root}/vae/<conditioning id>``), with a fingerprint that
  names the conditioning dataset (``LatentCache.namespace``), so they never collide with a target's.
- **Sampling** (``--conditioning_multidataset_sampling``): ``combined`` gives every linked dataset, one slot
  each in ``conditioning_data`` order; ``random`` draws one linked dataset per sample from
  (``--seed``, epoch, sample key): the same in every run, so a resumed run sees the same draws.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from kubetuner_trainer.config.errors import MISSING, Problem

from .buckets import SamplePlan, assign_buckets, bucket_label
from .dataset_config import DatasetConfig, DatasetConfigError, DatasetEntry
from .discovery import discover
from .metadata import MetadataCache
from .settings import DataSettings
from .storage import LocalStorage, Storage, StorageError

log = logging.getLogger(__name__)

LOOSE = "reference_loose"
#: how many missing files a pairing error names
SHOWN_MISSING = 5


@dataclass
class ConditioningSet:
    """One conditioning dataset as linked to one training dataset: its storage and each target's pair."""

    entry: DatasetEntry
    storage: Storage
    #: target key -> the conditioning sample's plan (the target's geometry unless ``reference_loose``)
    plans: dict[str, SamplePlan]
    unpaired: list[str] = field(default_factory=list)  # conditioning files no training file pairs with
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unreadable conditioning files

    @property
    def conditioning_type(self) -> str:
        return self.entry.conditioning_type or "reference_strict"


def pair_plan(target: SamplePlan, key: str, version: str, size: tuple[int, int]) -> SamplePlan:
    """The conditioning file ``key``'s plan when it is aligned with ``target``: the target's intermediate
    size, crop box and bucket (so both images are cut from the same region, pixel for pixel)."""
    return replace(target, key=key, version=version, original_size=size)


def sample_context(dataset_id: str, plan: SamplePlan) -> str:
    """A conditioning sample's identity for caches keyed on it (dataset, file, version, geometry)."""
    text = f"{dataset_id}\0{plan.key}\0{plan.version}\0{sorted(plan.geometry().items())}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def choose_slot(seed: int, epoch: int, key: str, count: int) -> int:
    """``random`` sampling: which of ``count`` linked datasets feeds sample ``key`` in ``epoch`` (seeded)."""
    digest = hashlib.sha256(f"{seed}\0conditioning\0{epoch}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % count


def generate_missing(entry: DatasetEntry, storage: Storage, source: Storage, keys: list[str],
                     settings: DataSettings) -> int:
    """Write the generated conditioning file of every ``keys`` (source file) that has none yet; returns how
    many were written. Writes are atomic (``Storage.write``), so an interrupted run leaves no partial file."""
    from .decode import decode_rgb
    from .generated import encoded, generate

    assert entry.generator is not None
    existing = {o.key for o in storage.list()}
    written = 0
    for key in keys:
        if key in existing:
            continue
        try:
            image = decode_rgb(source.read(key))
        except Exception as error:  # an unreadable source is left out by the target's own caching
            log.warning("dataset %s: cannot generate from %s: %s", entry.id, key, error)
            continue
        result = generate(entry.generator["type"], image, entry.generator, seed=settings.seed,
                          dataset_id=entry.id, key=key)
        storage.write(key, encoded(result, key))
        written += 1
    if written:
        log.info("dataset %s: generated %d conditioning images (%s) in %s", entry.id, written,
                 entry.generator["type"], storage.describe())
    return written


def prepare_conditioning(target_entry: DatasetEntry, target_plans: list[SamplePlan], source: Storage,
                         entry: DatasetEntry, settings: DataSettings, *, environ: Mapping[str, str] | None = None,
                         metadata_store: Storage | None = None, check_pairs: bool = True) -> ConditioningSet:
    """Discover conditioning dataset ``entry`` and pair it with ``target_plans`` (the target's samples).

    Raises ``DatasetConfigError`` naming ``datasets[<entry id>]`` and the first missing files when a target
    sample has no pair (``check_pairs``), or when ``reference_loose`` pairs of one bucket differ in size.
    """
    from .prepare import open_dataset_storage

    storage = open_dataset_storage(entry, settings, environ)
    if entry.generator is not None:
        assert isinstance(storage, LocalStorage)
        os.makedirs(storage.root, exist_ok=True)
        generate_missing(entry, storage, source, sorted({p.key for p in target_plans}), settings)
    metadata = MetadataCache(metadata_store, f"{entry.id}.json", entry.id, storage.describe())
    try:
        found = discover(storage, metadata, trust_cache=entry.preserve_data_backend_cache or entry.skips("metadata"),
                         workers=settings.max_workers, save_interval=settings.metadata_update_interval)
    except StorageError as error:
        from .prepare import DataError

        raise DataError(f"dataset {entry.id}: cannot list {storage.describe()}: {error}") from error
    infos = {info.key: info for info in found.images}
    wanted = {p.key for p in target_plans}
    missing = sorted(wanted - set(infos))
    if missing and check_pairs:
        raise DatasetConfigError([pairing_problem(entry, target_entry, missing, found.skipped)])
    plans: dict[str, SamplePlan] = {}
    if entry.conditioning_type == LOOSE:
        buckets = assign_buckets([infos[k] for k in sorted(wanted & set(infos))], entry,
                                 alignment=settings.aspect_bucket_alignment, rounding=settings.aspect_bucket_rounding,
                                 seed=settings.seed)
        plans = {p.key: p for ps in buckets.buckets.values() for p in ps}
        if check_pairs:
            _check_loose(entry, target_plans, plans, settings, buckets.skipped)
    else:
        for plan in target_plans:
            info = infos.get(plan.key)
            if info is not None:
                plans[plan.key] = pair_plan(plan, info.key, info.version, info.size)
    return ConditioningSet(entry, storage, plans, unpaired=sorted(set(infos) - wanted), skipped=list(found.skipped))


def pairing_problem(entry: DatasetEntry, target: DatasetEntry, missing: list[str],
                    skipped: list[tuple[str, str]] = ()) -> Problem:
    """The configuration problem of training files of ``target`` without a pair in ``entry``."""
    shown = ", ".join(missing[:SHOWN_MISSING]) + (", ..." if len(missing) > SHOWN_MISSING else "")
    unreadable = {k for k, _ in skipped}
    why = " (some are unreadable there)" if unreadable & set(missing) else ""
    return Problem(f"datasets[{entry.id}]", entry.location,
                   f"has no conditioning image for {len(missing)} training file(s) of dataset {target.id}{why}: "
                   f"{shown}; a conditioning file pairs with the training file of the same relative path")


def _check_loose(entry: DatasetEntry, target_plans: list[SamplePlan], plans: dict[str, SamplePlan],
                 settings: DataSettings, skipped: list[tuple[str, str]]) -> None:
    problems = []
    left_out = sorted({p.key for p in target_plans} - set(plans))
    if left_out:
        reasons = dict(skipped)
        shown = "; ".join(f"{k} ({reasons.get(k, 'left out')})" for k in left_out[:SHOWN_MISSING])
        problems.append(Problem(f"datasets[{entry.id}]", entry.location,
                                f"{len(left_out)} conditioning image(s) cannot be planned: {shown}"))
    if settings.train_batch_size > 1:
        by_bucket: dict[tuple[int, ...], set[tuple[int, ...]]] = {}
        for plan in target_plans:
            if plan.key in plans:
                by_bucket.setdefault(plan.bucket, set()).add(plans[plan.key].bucket)
        mixed = {b: sizes for b, sizes in by_bucket.items() if len(sizes) > 1}
        if mixed:
            bucket, sizes = next(iter(mixed.items()))
            problems.append(Problem(
                f"datasets[{entry.id}].conditioning_type", LOOSE,
                f"the conditioning images of target bucket {bucket_label(bucket)} have {len(sizes)} sizes "
                f"({', '.join(bucket_label(s) for s in sorted(sizes))}) and a batch needs one; use reference_strict, "
                "crop them to one aspect, or train with train_batch_size 1"))
    if problems:
        raise DatasetConfigError(problems)


def conditioning_sets(config: DatasetConfig, target: DatasetEntry, target_plans: list[SamplePlan], source: Storage,
                      settings: DataSettings, *, environ: Mapping[str, str] | None = None,
                      metadata_store: Storage | None = None, check_pairs: bool = True) -> list[ConditioningSet]:
    """Every enabled conditioning dataset linked to ``target``, prepared and paired (see ``prepare_conditioning``)."""
    return [prepare_conditioning(target, target_plans, source, entry, settings, environ=environ,
                                 metadata_store=metadata_store, check_pairs=check_pairs)
            for entry in config.conditioning_for(target)]


def conditioning_problems(config: DatasetConfig, required: bool, allowed_types: tuple[str, ...] | None,
                          family: str | None, flavour: str | None, eval_dataset_id: str | None = None) -> list[Problem]:
    """Dataset-list rules the model family sets: every training dataset must link conditioning data when the
    flavour needs it (``ModelFamily.requires_conditioning``), with a ``conditioning_type`` it takes; such a
    flavour has no evaluation loss yet (its evaluation batches would lack the conditioning inputs)."""
    problems = []
    name = f"{family} {flavour}" if flavour else str(family)
    if required:
        for entry in config.entries:
            if entry.dataset_type == "eval" and not entry.disabled:
                problems.append(Problem(f"datasets[{entry.id}].dataset_type", "eval",
                                        f"model {name} trains on conditioning inputs; its evaluation loss is not "
                                        "supported yet by this trainer: disable this entry"))
        if eval_dataset_id:
            problems.append(Problem("eval_dataset_id", eval_dataset_id,
                                    f"model {name} trains on conditioning inputs; its evaluation loss is not "
                                    "supported yet by this trainer"))
    for entry in config.entries:
        if entry.disabled or entry.dataset_type not in ("image", "video"):
            continue
        linked = config.conditioning_for(entry)
        if required and not linked:
            problems.append(Problem(f"datasets[{entry.id}].conditioning_data", MISSING,
                                    f"is required by model {name}: link a dataset_type 'conditioning' entry "
                                    "(or add a 'conditioning' block) holding the input image of each training image"))
        for cond in linked:
            kind = cond.conditioning_type or "reference_strict"
            if allowed_types is not None and kind not in allowed_types:
                problems.append(Problem(f"datasets[{cond.id}].conditioning_type", kind,
                                        f"model {name} takes {', '.join(allowed_types)}"))
    return problems


@dataclass(frozen=True)
class ValidationSample:
    """A training sample rendered at validation: its caption and its conditioning images (PIL, RGB), each
    prepared with the target's plan (the size and crop training saw)."""

    short_name: str
    prompt: str
    images: tuple
    target_size: tuple[int, int]  # (width, height)


def validation_samples(cfg: object, count: int, *, environ: Mapping[str, str] | None = None,
                       conditioning: bool = True) -> list[ValidationSample]:
    """Up to ``count`` samples of every training dataset that links conditioning data, in key order (the same
    every run), named ``<dataset id>_<n>`` — SimpleTuner's edit-model validation inputs. ``conditioning=False``:
    of every image training dataset, each with its own image prepared as training prepares it
    (``--validation_using_datasets``)."""
    from .dataset_config import load_dataset_config
    from .images import load_pixels
    from .prepare import metadata_storage, prepare_dataset
    from .settings import settings_from_config

    settings = settings_from_config(cfg)
    if not settings.data_backend_config:
        return []
    config = load_dataset_config(settings.data_backend_config, settings)
    store = metadata_storage(settings)
    out = []
    for entry in config.image_datasets:
        if entry.dataset_type != "image" or (conditioning and not config.conditioning_for(entry)):
            continue
        item = prepare_dataset(entry, settings, environ=environ, metadata_store=store)
        plans = sorted((p for ps in item.buckets.buckets.values() for p in ps), key=lambda p: p.key)
        sets = conditioning_sets(config, entry, plans, item.storage, settings, environ=environ, metadata_store=store,
                                 check_pairs=False) if conditioning else []
        for index, plan in enumerate(p for p in plans if all(p.key in s.plans for s in sets)):
            if index >= count:
                break
            images = tuple(_to_image(load_pixels(s.storage, s.plans[plan.key])) for s in sets) if conditioning \
                else (_to_image(load_pixels(item.storage, plan)),)
            out.append(ValidationSample(f"{entry.id}_{index}", item.captions[plan.key], images, plan.target_size))
    return out


def _to_image(pixels):
    """``[3, H, W]`` in [-1, 1] → an RGB PIL image."""
    from PIL import Image

    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array, "RGB")
