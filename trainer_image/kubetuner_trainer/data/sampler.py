"""Which samples form each batch, on every rank, epoch after epoch, resumable exactly.

The schedule of an epoch is a pure function of (seed, epoch, datasets): every bucket is shuffled with
its own seeded generator, cut into *global* batches of ``batch_size × world_size`` samples (one bucket
per batch), and the datasets' batches are interleaved by a seeded weighted draw. Rank ``r`` takes slice
``r`` of each global batch, so ranks never share a sample and all ranks agree on the order without
talking to each other. The state is just (epoch, position): restoring it replays the identical batches.

Weights: ``auto-weighting`` draws a dataset in proportion to ``probability × its sample count``;
``uniform`` uses ``probability`` alone. A dataset with ``probability`` 0 is not sampled. An epoch ends
when every dataset has given all its full batches; incomplete tails of a bucket are left for later
epochs (the shuffle differs each epoch) unless the bucket is smaller than one global batch and pruning
is disabled, in which case its samples are cycled to fill one batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .buckets import BucketKey, SamplePlan, bucket_label

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetSamples:
    id: str
    buckets: dict[BucketKey, list[SamplePlan]]
    repeats: int = 0
    probability: float = 1.0
    is_regularisation: bool = False

    @property
    def sample_count(self) -> int:
        return sum(len(v) for v in self.buckets.values()) * (self.repeats + 1)


@dataclass(frozen=True)
class ScheduledBatch:
    dataset_index: int
    plans: tuple[SamplePlan, ...]  # this rank's samples
    epoch: int
    position: int  # index of this batch within the epoch


def _rng(*parts: Any) -> random.Random:
    digest = hashlib.sha256("\0".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


class Sampler:
    def __init__(self, datasets: list[DatasetSamples], *, batch_size: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0, sampling: str = "auto-weighting", fill_small_buckets: bool = False):
        if sampling not in ("auto-weighting", "uniform"):
            raise ValueError(f"data_backend_sampling {sampling!r} is not one of: auto-weighting, uniform")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.datasets = datasets
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.sampling = sampling
        self.fill_small_buckets = fill_small_buckets
        self.epoch = 0
        self.position = 0
        self._schedule: tuple[int, list[tuple[int, list[SamplePlan]]]] | None = None
        self._fingerprint: str | None = None

    def fingerprint(self) -> str:
        """Identifies the datasets and layout the schedule is made of (stored with the state)."""
        if self._fingerprint is None:
            self._fingerprint = self._compute_fingerprint()
        return self._fingerprint

    def _compute_fingerprint(self) -> str:
        shape = [(d.id, d.repeats, d.probability, sorted((bucket_label(b), [p.key for p in ps])
                                                          for b, ps in d.buckets.items()))
                 for d in self.datasets]
        payload = [shape, self.batch_size, self.world_size, self.seed, self.sampling, self.fill_small_buckets]
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:32]

    def _global_batches(self, index: int, epoch: int) -> list[list[SamplePlan]]:
        dataset = self.datasets[index]
        size = self.batch_size * self.world_size
        batches: list[list[SamplePlan]] = []
        for bucket, plans in sorted(dataset.buckets.items()):
            items = list(plans) * (dataset.repeats + 1)
            _rng(self.seed, epoch, dataset.id, bucket).shuffle(items)
            if len(items) < size and self.fill_small_buckets and items:
                items = (items * (size // len(items) + 1))[:size]
            batches.extend(items[i:i + size] for i in range(0, len(items) - size + 1, size))
        _rng(self.seed, epoch, dataset.id, "order").shuffle(batches)
        return batches

    def schedule(self, epoch: int) -> list[tuple[int, list[SamplePlan]]]:
        """The epoch's global batches in order: (dataset index, all ranks' samples)."""
        if self._schedule is not None and self._schedule[0] == epoch:
            return self._schedule[1]
        queues = {i: self._global_batches(i, epoch) for i, d in enumerate(self.datasets) if d.probability > 0}
        weights = {i: d.probability * (d.sample_count if self.sampling == "auto-weighting" else 1)
                   for i, d in enumerate(self.datasets)}
        cursor = dict.fromkeys(queues, 0)
        mix = _rng(self.seed, epoch, "mix")
        order: list[tuple[int, list[SamplePlan]]] = []
        live = [i for i in queues if queues[i]]
        while live:
            total = sum(weights[i] for i in live)
            pick = mix.random() * total
            chosen = live[-1]
            for i in live:
                pick -= weights[i]
                if pick < 0:
                    chosen = i
                    break
            order.append((chosen, queues[chosen][cursor[chosen]]))
            cursor[chosen] += 1
            if cursor[chosen] == len(queues[chosen]):
                live.remove(chosen)
        self._schedule = (epoch, order)
        return order

    @property
    def steps_per_epoch(self) -> int:
        """Batches this rank gets per epoch (micro-batches; divide by gradient accumulation for steps)."""
        return len(self.schedule(self.epoch))

    def _slice(self, plans: list[SamplePlan]) -> tuple[SamplePlan, ...]:
        start = self.rank * self.batch_size
        return tuple(plans[start:start + self.batch_size])

    def __iter__(self) -> Iterator[ScheduledBatch]:
        """Endless: continues into the next epoch; advances ``epoch``/``position`` as it goes."""
        while True:
            order = self.schedule(self.epoch)
            if not order:
                raise RuntimeError("no dataset yields a full batch; see the data report for pruned buckets")
            index, plans = order[self.position]
            batch = ScheduledBatch(index, self._slice(plans), self.epoch, self.position)
            self.position += 1
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
            yield batch

    def peek(self, epoch: int, position: int) -> ScheduledBatch:
        order = self.schedule(epoch)
        index, plans = order[position]
        return ScheduledBatch(index, self._slice(plans), epoch, position)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if state.get("fingerprint") != self.fingerprint():
            log.warning("the datasets or batch layout changed since this sampler state was saved; "
                        "continuing at epoch %d but the batch order differs from the original run", epoch)
        self.epoch = epoch
        self.position = min(position, len(self.schedule(epoch)))
        if self.position == len(self.schedule(epoch)):
            self.epoch, self.position = epoch + 1, 0
