"""The storage interface shared by datasets and caches.

Keys are ``/``-separated paths relative to the storage root (a folder or a bucket prefix). ``write``
is atomic: a reader sees either the previous object or the complete new one, never a partial one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


class StorageError(OSError):
    """A storage operation failed after retries (or cannot succeed, e.g. a missing bucket)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    version: str  # changes whenever the content may have changed (mtime for files, ETag for S3)


class Storage(ABC):
    """Minimal object-store view of a folder or bucket prefix."""

    #: threads used by the default batched helpers
    parallelism: int = 8

    @abstractmethod
    def describe(self) -> str:
        """Human-readable location (never contains credentials)."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object under ``prefix`` (recursive)."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo | None:
        """Size and version of one object, or None when it does not exist."""

    @abstractmethod
    def read(self, key: str) -> bytes:
        """The whole object; FileNotFoundError when missing."""

    @abstractmethod
    def read_range(self, key: str, start: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``start`` (fewer at the end of the object)."""

    @abstractmethod
    def write(self, key: str, data: bytes) -> None:
        """Store ``data`` atomically under ``key``."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None

    def location_problem(self) -> str | None:
        """Why this location cannot hold a dataset (e.g. "/data/shapez does not exist"), or None.

        Cheap (one stat or one listing request). Raises ``StorageError`` when the answer is unknown
        because the store cannot be reached right now (a transient fault, not a configuration error).
        """
        return None

    def read_many(self, keys: Iterable[str]) -> Iterator[tuple[str, bytes | Exception]]:
        """Read several objects concurrently, yielding ``(key, data or the error)`` in input order."""
        keys = list(keys)
        with ThreadPoolExecutor(max_workers=max(1, min(self.parallelism, len(keys) or 1))) as pool:
            futures = [pool.submit(self.read, key) for key in keys]
            for key, future in zip(keys, futures, strict=True):
                try:
                    yield key, future.result()
                except Exception as error:  # reported per key to the caller
                    yield key, error

    def write_many(self, items: Iterable[tuple[str, bytes]]) -> None:
        """Write several objects concurrently; raises the first failure after all finished."""
        items = list(items)
        if not items:
            return
        with ThreadPoolExecutor(max_workers=max(1, min(self.parallelism, len(items)))) as pool:
            results = [pool.submit(self.write, key, data) for key, data in items]
        for future in results:
            future.result()
