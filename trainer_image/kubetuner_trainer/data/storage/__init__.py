"""Where dataset files and caches live: one small interface, a local and an S3 implementation."""

from .base import ObjectInfo, Storage, StorageError
from .local import LocalStorage

__all__ = ["LocalStorage", "ObjectInfo", "Storage", "StorageError", "open_storage"]


def open_storage(kind: str, **kwargs):
    """``open_storage("local", root=...)`` or ``open_storage("aws", bucket=..., ...)``."""
    if kind == "local":
        return LocalStorage(kwargs["root"])
    if kind == "aws":
        from .s3 import S3Storage

        return S3Storage(**kwargs)
    raise ValueError(f"unknown storage type {kind!r}; supported: local, aws")
