"""Evaluation datasets: which dataset entries are held out of training, and their fixed batches.

Entries with ``"dataset_type": "eval"`` never reach the training sampler; their images are used for
the evaluation loss. ``--eval_dataset_id`` picks the one dataset to evaluate on: an ``eval`` entry, or
an ordinary image entry, which is then held out of training as well. ``EvalSource`` hands out every sample of those datasets in
a fixed order (no shuffling, no caption dropout), sharded over the processes, so an evaluation of
the same weights always sees the same inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .batch import Batch
from .buckets import SamplePlan
from .cache import MISSING_FILE, CacheEntry, Encoders, stack_entries
from .eval_split import eval_dataset_ids, held_out_ids, split_eval_problems
from .prepare import DataError

__all__ = ["EvalDataset", "EvalSource", "eval_dataset_ids", "held_out_ids", "split_eval_problems"]


@dataclass
class EvalDataset:
    """One held-out dataset: its id, its samples (plans) and where their latents and captions live."""

    id: str
    plans: list[SamplePlan]
    captions: dict[str, str]
    latents: Any  # LatentCache
    text: Any  # TextEmbedCache
    storage: Any  # the dataset's Storage (to encode a latent that is not cached yet)
    location: str


class EvalSource:
    """Every sample of the evaluation datasets, in a fixed order; ``batches()`` yields this rank's share."""

    def __init__(self, datasets: list[EvalDataset], encoders: Encoders, *, batch_size: int,
                 rank: int = 0, world_size: int = 1):
        self.datasets = datasets
        self.encoders = encoders
        self.batch_size = max(1, int(batch_size))
        self.rank = rank
        self.world_size = world_size

    @property
    def dataset_ids(self) -> list[str]:
        return [d.id for d in self.datasets]

    @property
    def sample_count(self) -> int:
        return sum(len(d.plans) for d in self.datasets)

    def shard(self, dataset: EvalDataset) -> list[SamplePlan]:
        """This rank's samples of ``dataset``, sorted by bucket then key (identical on every run)."""
        ordered = sorted(dataset.plans, key=lambda p: (p.target_size, p.key))
        return ordered[self.rank::self.world_size]

    def batches(self) -> Iterator[Batch]:
        """This rank's evaluation batches; each holds samples of one dataset and one bucket."""
        for dataset in self.datasets:
            plans = self.shard(dataset)
            by_size: dict[tuple[int, ...], list[SamplePlan]] = {}
            for plan in plans:
                by_size.setdefault(plan.bucket, []).append(plan)
            for size in sorted(by_size):
                group = by_size[size]
                for start in range(0, len(group), self.batch_size):
                    yield self._assemble(dataset, group[start:start + self.batch_size])

    def _latents(self, dataset: EvalDataset, plans: list[SamplePlan]) -> list[CacheEntry]:
        found = {p.key: dataset.latents.load(p) for p in plans}
        todo = [p for p in plans if found[p.key] is None]
        if todo:
            encoded, failed = dataset.latents.encode(todo, dataset.storage, self.encoders)
            if failed:
                what = "; ".join(f"{k}: {'file missing' if why == MISSING_FILE else why}" for k, why in failed)
                raise DataError(f"evaluation dataset {dataset.id}: cannot read {what}")
            found.update(encoded)
        return [found[p.key] for p in plans]

    def _assemble(self, dataset: EvalDataset, plans: list[SamplePlan]) -> Batch:
        latents, conditioning = stack_entries(self._latents(dataset, plans))
        captions = [dataset.captions[p.key] for p in plans]
        embeds = [dataset.text.get(c, self.encoders) for c in captions]
        return Batch(
            latents=latents,
            cached_conditioning=conditioning,
            text={key: torch.stack([e[key] for e in embeds]) for key in embeds[0]},
            original_sizes=[(p.original_size[1], p.original_size[0]) for p in plans],
            crop_coords=[p.crop_coords for p in plans],
            target_sizes=[(p.target_size[1], p.target_size[0]) for p in plans],
            captions=captions,
            paths=[f"{dataset.location}/{p.key}" for p in plans],
            dataset_ids=[dataset.id] * len(plans),
            is_regularisation=[False] * len(plans),
        )
