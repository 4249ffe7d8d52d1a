"""The background prefetcher: order, errors, waiting time, closing."""

from __future__ import annotations

import threading

import pytest

from kubetuner_trainer.data.prefetch import Prefetcher


def test_items_arrive_in_order_and_waits_are_measured():
    waits: list[float] = []
    assert list(Prefetcher(iter(range(50)), depth=3, on_wait=waits.append)) == list(range(50))
    assert len(waits) == 51 and all(w >= 0 for w in waits)


def test_producer_errors_reach_the_consumer():
    def broken():
        yield 1
        raise ValueError("disk on fire")

    prefetcher = Prefetcher(broken(), depth=2)
    assert next(prefetcher) == 1
    with pytest.raises(ValueError, match="disk on fire"):
        next(prefetcher)


def test_producer_runs_ahead_by_at_most_depth_and_close_stops_it():
    produced: list[int] = []
    gate = threading.Event()

    def source():
        for i in range(1000):
            produced.append(i)
            if i == 5:
                gate.set()
            yield i

    prefetcher = Prefetcher(source(), depth=4)
    assert next(prefetcher) == 0
    gate.wait(timeout=30)
    prefetcher.close()
    assert len(produced) <= 1 + 4 + 2  # consumed + queue + one in hand + one being built
    with pytest.raises(RuntimeError, match="closed"):
        next(prefetcher)
