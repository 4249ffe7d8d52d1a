"""A folder on a local (or mounted network) filesystem."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ...files import OUTPUT_FILE_MODE
from .base import ObjectInfo, Storage

TEMP_MARKER = ".kt-tmp-"


class LocalStorage(Storage):
    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser()
        self.parallelism = min(32, (os.cpu_count() or 2) * 4)

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def describe(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key if key else self.root

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        start = self._path(prefix)
        if not start.is_dir():
            return
        stack = [start]
        root_len = len(str(self.root).rstrip(os.sep)) + 1
        while stack:
            folder = stack.pop()
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except FileNotFoundError:
                continue
            for entry in entries:
                if entry.name.startswith(".") or TEMP_MARKER in entry.name:
                    continue
                if entry.is_dir(follow_symlinks=True):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=True):
                    st = entry.stat()
                    key = entry.path[root_len:].replace(os.sep, "/")
                    yield ObjectInfo(key, st.st_size, f"{st.st_size}:{st.st_mtime_ns}")

    def location_problem(self) -> str | None:
        if not self.root.exists():
            return f"{self.root} does not exist"
        if not self.root.is_dir():
            return f"{self.root} is not a folder"
        if not os.access(self.root, os.R_OK | os.X_OK):
            return f"{self.root} is not readable by this user (uid {os.getuid()})"
        return None

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            st = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return ObjectInfo(key, st.st_size, f"{st.st_size}:{st.st_mtime_ns}")

    def read(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def read_range(self, key: str, start: int, length: int) -> bytes:
        with open(self._path(key), "rb") as handle:
            handle.seek(start)
            return handle.read(length)

    def write(self, key: str, data: bytes) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=f"{target.name}{TEMP_MARKER}", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.chmod(temp, OUTPUT_FILE_MODE)  # mkstemp makes it 0600
            os.replace(temp, target)  # atomic on POSIX: readers never see a partial file
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def remove_stale_temps(self, older_than: float = 3600.0) -> int:
        """Delete temp files that killed writers left behind (only old ones: a live writer may own a new one)."""
        removed = 0
        if self.root.is_dir():
            limit = time.time() - older_than
            for path in self.root.rglob(f"*{TEMP_MARKER}*"):
                try:
                    if path.stat().st_mtime < limit:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:
                    pass
        return removed
