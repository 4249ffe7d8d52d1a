"""Captions per ``caption_strategy``: textfile, filename, instanceprompt, parquet.

Filters from ``caption_filter_list`` run last: each line is a regular expression whose matches are
removed, or ``s/pattern/replacement/`` to substitute. A list of strings, or a path to a text file holding
one filter per line, are both accepted.
"""

from __future__ import annotations

import codecs
import io
import logging
import posixpath
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .dataset_config import DatasetEntry, ParquetSpec
from .storage import Storage

log = logging.getLogger(__name__)
EMPTY_CAPTION_FILE = "empty caption file"


class CaptionError(ValueError):
    """Captions cannot be produced for a dataset as configured."""


@dataclass(frozen=True)
class CaptionFilter:
    pattern: re.Pattern[str]
    replacement: str = ""


def load_filters(items: Iterable[str]) -> list[CaptionFilter]:
    items = list(items)
    if len(items) == 1 and Path(items[0]).expanduser().is_file():
        items = Path(items[0]).expanduser().read_text(encoding="utf-8").splitlines()
    filters = []
    for line in items:
        if not line.strip():
            continue
        if line.startswith("s/") and line.count("/") >= 3:
            _, pattern, replacement, _rest = line.split("/", 3)
            filters.append(CaptionFilter(re.compile(pattern), replacement))
        else:
            filters.append(CaptionFilter(re.compile(line)))
    return filters


def apply_filters(caption: str, filters: list[CaptionFilter]) -> str:
    for f in filters:
        caption = f.pattern.sub(f.replacement, caption)
    return " ".join(caption.split())


def decode_caption(data: bytes) -> tuple[str, str | None]:
    """(text, note) for the bytes of a caption file; ``note`` says what was not plain UTF-8.

    A UTF-8 byte-order mark is dropped; UTF-16 is recognised by its byte-order mark, or without one by
    NUL bytes in every other position; bytes that are not valid UTF-8 are read as Windows-1252 (the usual
    origin of such files) and reported.
    """
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16", errors="replace"), None
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    if len(data) >= 2 and b"\x00" in data:
        odd, even = data[1::2], data[0::2]
        if odd.count(0) >= len(odd) // 2 and even.count(0) == 0:
            return data.decode("utf-16-le", errors="replace"), "UTF-16 without a byte-order mark"
        if even.count(0) >= len(even) // 2 and odd.count(0) == 0:
            return data.decode("utf-16-be", errors="replace"), "UTF-16 without a byte-order mark"
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as error:
        return (data.decode("cp1252", errors="replace"),
                f"not valid UTF-8 (byte {data[error.start]:#04x} at offset {error.start}); read as Windows-1252, "
                "save the file as UTF-8")


def caption_from_filename(key: str) -> str:
    stem = posixpath.splitext(posixpath.basename(key))[0]
    return " ".join(stem.replace("_", " ").split())


def sidecar_key(key: str) -> str:
    return posixpath.splitext(key)[0] + ".txt"


def read_parquet_captions(spec: ParquetSpec, storage: Storage) -> tuple[dict[str, str], dict[str, tuple[int, int]]]:
    """Map image identifiers to captions (and sizes, when width/height columns are named)."""
    import pyarrow.parquet as pq

    path = Path(spec.path).expanduser()
    try:
        data = path.read_bytes() if path.is_absolute() and path.is_file() else storage.read(spec.path)
        table = pq.read_table(io.BytesIO(data))
    except FileNotFoundError:
        raise CaptionError(f"parquet file {spec.path!r} not found (absolute path or key in the dataset)") from None
    except Exception as error:
        raise CaptionError(f"parquet file {spec.path!r} cannot be read: {error}") from None
    columns = set(table.column_names)
    wanted = [spec.filename_column, spec.caption_column, spec.fallback_caption_column, spec.width_column,
              spec.height_column]
    for column in wanted:
        if column and column not in columns:
            raise CaptionError(f"parquet file {spec.path!r} has no column {column!r}; columns: "
                               f"{', '.join(sorted(columns))}")
    rows = table.to_pydict()
    captions: dict[str, str] = {}
    sizes: dict[str, tuple[int, int]] = {}
    fallback = rows.get(spec.fallback_caption_column) if spec.fallback_caption_column else None
    for i, ident in enumerate(rows[spec.filename_column]):
        name = str(ident)
        caption = rows[spec.caption_column][i]
        if (caption is None or not str(caption).strip()) and fallback is not None:
            caption = fallback[i]
        if caption is not None and str(caption).strip():
            captions[name] = str(caption)
        if spec.width_column and spec.height_column:
            width, height = rows[spec.width_column][i], rows[spec.height_column][i]
            if width and height:
                sizes[name] = (int(width), int(height))
    return captions, sizes


def parquet_identifier(key: str, spec: ParquetSpec) -> str:
    base = posixpath.basename(key)
    return base if spec.identifier_includes_extension else posixpath.splitext(base)[0]


class Captioner:
    """Produces the caption of each image of one dataset."""

    def __init__(self, entry: DatasetEntry, storage: Storage, *, workers: int = 16):
        self.entry = entry
        self.storage = storage
        self.workers = workers
        self.filters = load_filters(entry.caption_filter_list)
        self._unreadable: dict[str, str] = {}  # key -> why its caption file could not be read
        self.parquet_captions: dict[str, str] = {}
        self.parquet_sizes: dict[str, tuple[int, int]] = {}
        if entry.caption_strategy == "parquet" and entry.parquet is not None:
            self.parquet_captions, self.parquet_sizes = read_parquet_captions(entry.parquet, storage)

    def known_size(self, key: str) -> tuple[int, int] | None:
        """The size the parquet file states for ``key``, so discovery need not read its header."""
        if not self.parquet_sizes or self.entry.parquet is None:
            return None
        return self.parquet_sizes.get(parquet_identifier(key, self.entry.parquet))

    def captions(self, keys: list[str]) -> tuple[dict[str, str], list[tuple[str, str]]]:
        """(caption per key, [(key, reason)] for images without a usable caption)."""
        entry = self.entry
        raw: dict[str, str | None] = {}
        missing: list[tuple[str, str]] = []
        if entry.only_instance_prompt or entry.caption_strategy == "instanceprompt":
            raw = dict.fromkeys(keys, entry.instance_prompt or "")
        elif entry.caption_strategy == "filename":
            raw = {key: caption_from_filename(key) for key in keys}
        elif entry.caption_strategy == "textfile":
            raw = self._textfiles(keys)
        elif entry.caption_strategy == "parquet":
            assert entry.parquet is not None
            raw = {key: self.parquet_captions.get(parquet_identifier(key, entry.parquet)) for key in keys}
        out: dict[str, str] = {}
        for key in keys:
            text = raw.get(key)
            if text is None:
                missing.append((key, self._missing_reason(key)))
                continue
            caption = apply_filters(text, self.filters)
            if entry.prepend_instance_prompt and entry.instance_prompt and not entry.only_instance_prompt \
                    and entry.caption_strategy != "instanceprompt":
                caption = f"{entry.instance_prompt} {caption}".strip()
            out[key] = caption
        return out, missing

    def _missing_reason(self, key: str) -> str:
        if self.entry.caption_strategy == "textfile":
            return self._unreadable.get(key, f"caption file {sidecar_key(key)} is missing")
        return f"no caption for {parquet_identifier(key, self.entry.parquet)!r} in the parquet file"  # type: ignore[arg-type]

    def _textfiles(self, keys: list[str]) -> dict[str, str | None]:
        where = self.storage.describe().rstrip("/")

        def read(key: str) -> str | None:
            try:
                data = self.storage.read(sidecar_key(key))
            except FileNotFoundError:
                return None
            except OSError as error:
                self._unreadable[key] = f"caption file {sidecar_key(key)} cannot be read ({error})"
                return None
            text, note = decode_caption(data)
            if note:
                log.warning("caption file %s/%s: %s", where, sidecar_key(key), note)
            text = " ".join(line.strip() for line in text.splitlines() if line.strip())
            if not text:
                # SimpleTuner trains such an image with an empty caption (the instance prompt when prepended)
                log.warning("caption file %s/%s: %s; the image trains with an empty caption", where,
                            sidecar_key(key), EMPTY_CAPTION_FILE)
            return text

        with ThreadPoolExecutor(max_workers=max(1, min(self.workers, len(keys) or 1))) as pool:
            return dict(zip(keys, pool.map(read, keys), strict=True))
