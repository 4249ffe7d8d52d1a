"""Publishing checkpoints and the final model: S3 targets (``--publishing_config``) and the Hugging Face Hub.

``--publishing_config`` holds one object or a list (inline JSON or a JSON file), like
``--webhook_config``. Each entry needs ``provider``: ``s3`` or ``backblaze_b2`` (the S3 API),
with ``bucket`` and optional ``region``, ``endpoint_url`` (S3-compatible stores),
``access_key``/``secret_key`` or ``access_key_env``/``secret_key_env`` (names of environment
variables holding them, so that a config can be stored without secrets; else the standard AWS
chain: env, profile, IRSA),
``base_path`` (key prefix), ``public_base_url`` (reported instead of ``s3://``),
``upload_checkpoints`` (default true).

The remote layout mirrors ``output_dir``: ``<base_path>/<output_dir name>/`` gets the final
model, ``.../checkpoint-<step>/`` each checkpoint.

Uploads run in one background worker when ``--push_to_hub_background`` is set, otherwise in
the caller's thread; either way :meth:`Publisher.close` waits for every queued upload, so the
final upload completes (or fails visibly) before the trainer exits.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from ._options import json_entries, option

log = logging.getLogger(__name__)

S3_PROVIDERS = ("s3", "backblaze_b2")
KNOWN_KEYS = {"provider", "bucket", "region", "endpoint_url", "access_key", "secret_key", "session_token",
              "access_key_env", "secret_key_env", "base_path", "public_base_url", "upload_checkpoints"}
# Top-level entries of output_dir left out of the final-model upload: checkpoints are uploaded on
# their own, the rest is scratch (caches, half-written checkpoints, debug log).
FINAL_EXCLUDE = ("checkpoint-*", ".tmp-*", "*.tmp", "cache", ".cache", "debug.log")


class PublishingConfigError(ValueError):
    """``--publishing_config`` is invalid; the message names the entry and field."""


@dataclass(frozen=True)
class S3Target:
    bucket: str
    provider: str = "s3"
    region: str | None = None
    endpoint_url: str | None = None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    base_path: str = ""
    public_base_url: str | None = None
    upload_checkpoints: bool = True

    @property
    def label(self) -> str:
        return f"{self.provider}:{self.bucket}"


def parse_publishing_config(value: Any) -> list[S3Target]:
    """Validate ``--publishing_config`` into targets; errors name the entry, field and allowed values."""
    targets = []
    for index, entry in enumerate(json_entries(value, "publishing_config", PublishingConfigError)):
        where = f"publishing_config[{index}]"
        if not isinstance(entry, dict):
            raise PublishingConfigError(f"{where} must be an object")
        provider = entry.get("provider")
        if provider not in S3_PROVIDERS:
            raise PublishingConfigError(
                f"{where}.provider is {provider!r}; kubetuner supports: {', '.join(S3_PROVIDERS)}"
            )
        unknown = sorted(set(entry) - KNOWN_KEYS)
        if unknown:
            raise PublishingConfigError(
                f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(KNOWN_KEYS))}"
            )
        bucket = entry.get("bucket")
        if not isinstance(bucket, str) or not bucket:
            raise PublishingConfigError(f"{where}.bucket is required (the bucket name)")
        endpoint = entry.get("endpoint_url")
        if endpoint is not None and not str(endpoint).startswith(("http://", "https://")):
            raise PublishingConfigError(f"{where}.endpoint_url must start with http:// or https://")
        for key in ("access_key", "secret_key"):
            variable = entry.get(f"{key}_env")
            if variable is None:
                continue
            if entry.get(key):
                raise PublishingConfigError(f"{where}: give {key} or {key}_env, not both")
            if not os.environ.get(str(variable)):
                raise PublishingConfigError(f"{where}.{key}_env names ${variable}, which is not set")
            entry = {**entry, key: os.environ[str(variable)]}
        if bool(entry.get("access_key")) != bool(entry.get("secret_key")):
            raise PublishingConfigError(f"{where}: give both access_key and secret_key, or neither")
        targets.append(S3Target(
            bucket=bucket, provider=provider, region=entry.get("region"), endpoint_url=endpoint,
            access_key=entry.get("access_key"), secret_key=entry.get("secret_key"),
            session_token=entry.get("session_token"),
            base_path=str(entry.get("base_path") or "").strip("/"),
            public_base_url=(str(entry["public_base_url"]).rstrip("/") if entry.get("public_base_url") else None),
            upload_checkpoints=bool(entry.get("upload_checkpoints", True)),
        ))
    return targets


def _excluded(relative: Path, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch(relative.parts[0], pattern) for pattern in patterns)


def files_to_upload(folder: Path, exclude: tuple[str, ...] = ()) -> list[Path]:
    """Files under ``folder`` (relative paths, sorted), skipping those under an excluded top-level entry."""
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            relative = path.relative_to(folder)
            if not _excluded(relative, exclude):
                found.append(relative)
    return found


class S3Uploader:
    """Uploads folders to one S3 (or S3-compatible) bucket with boto3."""

    def __init__(self, target: S3Target, client: Any = None) -> None:
        self.target = target
        self._client = client

    def _s3(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            kwargs: dict[str, Any] = {
                "region_name": self.target.region,
                "endpoint_url": self.target.endpoint_url,
                "config": Config(retries={"mode": "standard", "max_attempts": 5},
                                 connect_timeout=10, read_timeout=120),
            }
            if self.target.access_key:
                kwargs.update(aws_access_key_id=self.target.access_key,
                              aws_secret_access_key=self.target.secret_key,
                              aws_session_token=self.target.session_token)
            self._client = boto3.client("s3", **kwargs)
        return self._client

    def prefix_for(self, remote_name: str) -> str:
        return "/".join(p for p in (self.target.base_path, remote_name.strip("/")) if p)

    def uri_for(self, prefix: str) -> str:
        if self.target.public_base_url:
            return f"{self.target.public_base_url}/{prefix}/"
        return f"s3://{self.target.bucket}/{prefix}/"

    def upload_folder(self, folder: Path, remote_name: str, exclude: tuple[str, ...] = ()) -> str:
        """Upload every file of ``folder`` under ``<base_path>/<remote_name>/``; returns the URI."""
        prefix = self.prefix_for(remote_name)
        client = self._s3()
        files = files_to_upload(folder, exclude)
        for relative in files:
            client.upload_file(str(folder / relative), self.target.bucket, f"{prefix}/{relative.as_posix()}")
        log.info("uploaded %d file(s) from %s to %s", len(files), folder, self.uri_for(prefix))
        return self.uri_for(prefix)


def model_card(cfg: Any, repo_id: str) -> str:
    """README.md for the Hub: metadata block plus a short description in kubetuner's words."""
    family = option(cfg, "model_family", "unknown")
    model_type = option(cfg, "model_type")
    base = option(cfg, "pretrained_model_name_or_path")
    tags = ["kubetuner", "diffusers", "text-to-image", str(family)]
    if model_type == "lora":
        tags.append("lora")
    if not option(cfg, "model_card_safe_for_work"):
        tags.append("not-for-all-audiences")
    lines = ["---", "library_name: diffusers"]
    if base:
        lines.append(f"base_model: {base}")
    lines.append("tags:")
    lines.extend(f"- {t}" for t in tags)
    lines += ["---", "", f"# {repo_id}", ""]
    note = option(cfg, "model_card_note")
    if note:
        lines += [str(note), ""]
    kind = "LoRA adapter" if model_type == "lora" else "full fine-tune"
    lines.append(f"A {kind} of the {family} model family" + (f", trained from `{base}`" if base else "")
                 + " with kubetuner.")
    lines.append("")
    if not option(cfg, "model_card_safe_for_work"):
        lines += ["**Content warning:** the training data was not reviewed for safety; outputs may be "
                  "unsuitable for some audiences.", ""]
    settings = [(name, option(cfg, name)) for name in (
        "learning_rate", "max_train_steps", "num_train_epochs", "train_batch_size", "optimizer",
        "lr_scheduler", "resolution", "lora_rank", "lora_alpha", "validation_prompt")]
    rows = [(n, v) for n, v in settings if v is not None]
    if rows:
        lines += ["## Training settings", "", "| option | value |", "| --- | --- |"]
        lines += [f"| {n} | {str(v).replace('|', '/')} |" for n, v in rows]
        lines.append("")
    return "\n".join(lines)


def default_repo_name(cfg: Any) -> str:
    """A Hub repository name derived from the run when ``--hub_model_id`` is blank."""
    base = option(cfg, "tracker_run_name") or Path(str(option(cfg, "output_dir", "model"))).name
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{option(cfg, 'model_family', 'model')}-{base}").strip("-.")
    return name[:96] or "kubetuner-model"


class HubUploader:
    """Pushes folders to one Hugging Face Hub model repository through ``huggingface_hub.HfApi``.

    The endpoint and token come from ``HF_ENDPOINT`` / ``HF_TOKEN`` unless given.
    """

    def __init__(self, repo_id: str, *, private: bool, endpoint: str | None = None, token: str | None = None,
                 api: Any = None) -> None:
        self.repo_id = repo_id
        self.private = private
        self._endpoint, self._token, self._api = endpoint, token, api
        self._created = False

    def _hf(self) -> Any:
        if self._api is None:
            from huggingface_hub import HfApi

            self._api = HfApi(endpoint=self._endpoint, token=self._token)
        if not self._created:
            url = self._api.create_repo(self.repo_id, private=self.private, exist_ok=True, repo_type="model")
            self.repo_id = getattr(url, "repo_id", None) or self.repo_id
            self._created = True
        return self._api

    def upload_folder(self, folder: Path, path_in_repo: str | None, message: str,
                      exclude: tuple[str, ...] = ()) -> str:
        api = self._hf()
        ignore = [f"{p}/**" for p in exclude] + list(exclude)
        api.upload_folder(repo_id=self.repo_id, folder_path=str(folder), path_in_repo=path_in_repo,
                          commit_message=message, ignore_patterns=ignore or None, repo_type="model")
        base = (self._endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
        uri = f"{base}/{self.repo_id}" + (f"/tree/main/{path_in_repo}" if path_in_repo else "")
        log.info("pushed %s to %s", folder, uri)
        return uri


UploadCallback = Callable[[str, str, int | None], None]  # (target label, uri, step or None)


class Publisher:
    """Decides what goes where and when; runs uploads inline or in one background worker."""

    def __init__(
        self,
        *,
        s3: list[S3Uploader],
        hub: HubUploader | None,
        push_checkpoints_to_hub: bool,
        background: bool,
        output_dir: Path,
        on_uploaded: UploadCallback,
        on_failed: Callable[[str], None] | None = None,
        metrics: Any = None,
    ) -> None:
        self._s3, self._hub = s3, hub
        self._push_checkpoints = push_checkpoints_to_hub
        self._output_dir = output_dir
        self._on_uploaded = on_uploaded
        self._on_failed = on_failed
        self._metrics = metrics
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="kubetuner-upload") if background else None
        self._pending: list[Future] = []
        self._lock = threading.Lock()
        self.failures: list[str] = []

    @property
    def hub_repo_id(self) -> str | None:
        return self._hub.repo_id if self._hub is not None else None

    @property
    def enabled(self) -> bool:
        return bool(self._s3) or self._hub is not None

    def checkpoint(self, step: int, path: Path) -> None:
        jobs = [(u.target.label, "s3", lambda u=u: u.upload_folder(path, self._remote(path.name)))
                for u in self._s3 if u.target.upload_checkpoints]
        if self._hub is not None and self._push_checkpoints:
            hub = self._hub
            jobs.append(("hub", "hub", lambda: hub.upload_folder(path, path.name, f"checkpoint at step {step}")))
        for label, kind, job in jobs:
            self._submit(label, kind, job, step)

    def final(self, folder: Path, card: str | None = None) -> None:
        jobs = [(u.target.label, "s3",
                 lambda u=u: u.upload_folder(folder, self._remote(""), FINAL_EXCLUDE)) for u in self._s3]
        if self._hub is not None:
            if card is not None:
                (folder / "README.md").write_text(card, encoding="utf-8")
            hub = self._hub
            jobs.append(("hub", "hub", lambda: hub.upload_folder(folder, None, "final model", FINAL_EXCLUDE)))
        for label, kind, job in jobs:
            self._submit(label, kind, job, None)

    def _remote(self, name: str) -> str:
        return "/".join(p for p in (self._output_dir.name, name) if p)

    def _submit(self, label: str, kind: str, job: Callable[[], str], step: int | None) -> None:
        def run() -> None:
            started = time.monotonic()
            try:
                uri = job()
            except Exception as error:
                what = f"checkpoint {step}" if step is not None else "final model"
                message = f"upload of {what} to {label} failed: {error}"
                log.error("%s", message)
                with self._lock:
                    self.failures.append(f"{label}: {error}")
                self._count(kind, "failed")
                if self._on_failed is not None:
                    self._on_failed(message)
                return
            if self._metrics is not None:
                self._metrics.upload_duration.labels(target=kind).observe(time.monotonic() - started)
            self._count(kind, "ok")
            self._on_uploaded(label, uri, step)

        if self._executor is None:
            run()
        else:
            with self._lock:
                self._pending.append(self._executor.submit(run))

    def _count(self, kind: str, result: str) -> None:
        if self._metrics is not None:
            self._metrics.uploads.labels(target=kind, result=result).inc()

    def close(self) -> None:
        """Wait for every queued upload (the final one included)."""
        if self._executor is not None:
            with self._lock:
                pending = list(self._pending)
            if pending:
                log.info("waiting for %d upload(s) to finish", sum(not f.done() for f in pending))
            self._executor.shutdown(wait=True)
