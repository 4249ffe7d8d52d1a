"""Build batches ahead of the training step on a background thread.

The consumer's waiting time is measured either way, so ``data_wait_seconds`` tells whether the data
source keeps up with training.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
_DONE = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher(Generic[T]):
    """Iterates ``source`` on a daemon thread, keeping up to ``depth`` items ready."""

    def __init__(self, source: Iterator[T], depth: int = 10, on_wait: Callable[[float], None] | None = None):
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._on_wait = on_wait
        self._source = source
        self._thread = threading.Thread(target=self._run, name="kubetuner-data-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._source:
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(_DONE)
        except BaseException as error:  # handed to the consumer, raised there
            self._queue.put(_Failure(error))

    def __iter__(self) -> Prefetcher[T]:
        return self

    def __next__(self) -> T:
        started = time.perf_counter()
        while True:
            if self._stop.is_set():
                raise RuntimeError("this prefetcher was closed (a newer iterator replaced it)")
            try:
                item = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                continue
        if self._on_wait:
            self._on_wait(time.perf_counter() - started)
        if item is _DONE:
            raise StopIteration
        if isinstance(item, _Failure):
            raise item.error
        return item  # type: ignore[return-value]

    @property
    def ready(self) -> int:
        return self._queue.qsize()

    def close(self) -> None:
        """Stop the producer and wait for it (it finishes the batch it is building)."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()
