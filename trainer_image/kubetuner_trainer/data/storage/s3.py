"""An S3 (or S3-compatible) bucket prefix, through boto3.

botocore retries single calls on throttling and 5xx (``standard`` mode with exponential backoff); listing
pages and whole operations get an extra retry loop here because a long listing must not die on one
transient error. Credentials are never part of ``repr`` or messages.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, EndpointConnectionError

from .base import ObjectInfo, Storage, StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRYABLE_CODES = frozenset({
    "Throttling", "ThrottlingException", "SlowDown", "RequestTimeout", "RequestTimeTooSkewed",
    "InternalError", "ServiceUnavailable", "503", "500", "502", "504",
})


def is_transient(error: BaseException) -> bool:
    """Whether retrying ``error`` later can help (throttling, 5xx, broken connections)."""
    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return code in RETRYABLE_CODES or status >= 500 or status == 429
    return isinstance(error, EndpointConnectionError | ConnectionError | BotoCoreError)


def with_retries(call: Callable[[], T], *, what: str, attempts: int = 6, base_delay: float = 0.2,
                 max_delay: float = 10.0, sleep: Callable[[float], None] = time.sleep) -> T:
    """Run ``call``; on a transient error wait (exponential backoff with jitter) and try again."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as error:
            if not is_transient(error) or attempt == attempts:
                raise
            delay = min(max_delay, base_delay * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
            log.warning("%s failed (%s), retry %d/%d in %.2fs", what, type(error).__name__, attempt,
                        attempts - 1, delay)
            sleep(delay)
    raise AssertionError("unreachable")


class S3Storage(Storage):
    def __init__(self, bucket: str, prefix: str = "", *, region: str | None = None,
                 endpoint_url: str | None = None, access_key_id: str | None = None,
                 secret_access_key: str | None = None, max_pool_connections: int = 128,
                 max_attempts: int = 8, page_size: int = 1000, client: Any | None = None):
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url
        self.page_size = page_size
        self.parallelism = max(1, min(max_pool_connections, 64))
        if client is None:
            config = Config(
                retries={"max_attempts": max_attempts, "mode": "standard"},
                max_pool_connections=max_pool_connections,
                connect_timeout=10,
                read_timeout=60,
            )
            client = boto3.session.Session().client(
                "s3", region_name=region, endpoint_url=endpoint_url, aws_access_key_id=access_key_id,
                aws_secret_access_key=secret_access_key, config=config,
            )
        self.client = client

    def __repr__(self) -> str:
        return f"S3Storage({self.describe()!r})"

    def describe(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}"
        return f"{where} at {self.endpoint_url}" if self.endpoint_url else where

    def _key(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def _error(self, action: str, key: str, error: Exception) -> StorageError:
        return StorageError(f"S3 {action} of {key!r} in {self.describe()} failed: {error}")

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        token: str | None = None
        full_prefix = self._key(prefix)
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full_prefix, "MaxKeys": self.page_size}
            if token:
                kwargs["ContinuationToken"] = token
            try:
                page = with_retries(lambda kw=kwargs: self.client.list_objects_v2(**kw), what="S3 listing")
            except ClientError as error:
                raise self._error("listing", full_prefix, error) from error
            for item in page.get("Contents", ()):
                key = item["Key"][len(self.prefix):]
                if not key or key.endswith("/"):
                    continue
                yield ObjectInfo(key, int(item["Size"]), str(item.get("ETag", "")).strip('"'))
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def location_problem(self) -> str | None:
        where = self.describe()
        try:
            page = with_retries(lambda: self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix,
                                                                    MaxKeys=1), what="S3 listing")
        except ClientError as error:
            if is_transient(error):
                raise self._error("listing", self.prefix, error) from error
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code == "NoSuchBucket":
                return f"{where}: bucket {self.bucket!r} does not exist"
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                return f"{where}: access denied ({code}); check the dataset's credentials and the bucket policy"
            return f"{where}: cannot be listed ({code or error})"
        except BotoCoreError as error:
            raise StorageError(f"S3 listing of {where} failed: {error}") from error
        if not page.get("Contents"):
            return f"{where} does not exist (no object under this prefix)"
        return None

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            head = with_retries(lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(key)),
                                what="S3 head")
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._error("head", key, error) from error
        return ObjectInfo(key, int(head["ContentLength"]), str(head.get("ETag", "")).strip('"'))

    def _get(self, key: str, **extra: Any) -> bytes:
        def call() -> bytes:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key), **extra)
            return response["Body"].read()

        try:
            return with_retries(call, what="S3 read")
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code")
            if code in ("NoSuchKey", "404"):
                raise FileNotFoundError(f"{self.describe()}{key}") from None
            if code == "InvalidRange":
                return b""
            raise self._error("read", key, error) from error

    def read(self, key: str) -> bytes:
        return self._get(key)

    def read_range(self, key: str, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        return self._get(key, Range=f"bytes={start}-{start + length - 1}")

    def write(self, key: str, data: bytes) -> None:
        # One PUT: S3 makes an object visible only once it is complete, so the write is atomic.
        try:
            with_retries(lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data),
                         what="S3 write")
        except ClientError as error:
            raise self._error("write", key, error) from error

    def delete(self, key: str) -> None:
        try:
            with_retries(lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key)),
                         what="S3 delete")
        except ClientError as error:
            raise self._error("delete", key, error) from error
