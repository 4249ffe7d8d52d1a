"""Webhooks (``--webhook_config``): JSON events to ``raw`` endpoints, messages to Discord.

Events are queued and delivered by one background thread per target, so a slow or dead
endpoint never stalls training: each request has a bounded timeout and when a target's
queue is full the newest event is dropped and counted
(``kubetuner_trainer_webhook_events_total{result="dropped"}``).

Config: one object or a list of objects, inline JSON or a JSON file. Keys:

* ``webhook_type``: ``raw`` or ``discord`` (required).
* ``callback_url`` (raw) / ``webhook_url`` (discord): where to POST; either key is accepted.
* ``api_key`` (alias ``auth_token``): sent as the ``X-API-Key`` header (raw only); or ``api_key_env``:
  the name of an environment variable holding it (in Kubernetes, filled from a Secret by spec.secrets.env).
* ``headers``: extra HTTP headers (raw only).
* ``log_level``: lowest severity sent (``debug``, ``info``, ``warning``, ``error``; default ``info``).
* ``message_prefix``: text put before Discord messages.
* ``timeout``: seconds per request (default 10, at most 60).
* ``ssl_no_verify``: skip TLS certificate checks.
* ``queue_size``: events kept waiting per target (default 256).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import queue
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..contract import CheckpointInfo, TrainerState, TrainerStatus
from ._options import json_entries
from .clip_evaluation import MEAN as CLIP_MEAN
from .status import utc_now

log = logging.getLogger(__name__)

TYPES = ("raw", "discord")
LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
DEFAULT_TIMEOUT = 10.0
MAX_TIMEOUT = 60.0
DEFAULT_QUEUE_SIZE = 256
DISCORD_LIMIT = 2000  # characters per Discord message
KNOWN_KEYS = {
    "webhook_type", "callback_url", "webhook_url", "api_key", "auth_token", "api_key_env", "headers", "log_level",
    "message_prefix", "timeout", "ssl_no_verify", "queue_size",
}


class WebhookConfigError(ValueError):
    """The webhook configuration is invalid; the message names the entry and field."""


@dataclass(frozen=True)
class WebhookTarget:
    kind: str
    url: str
    api_key: str | None = field(default=None, repr=False)
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    min_level: int = LEVELS["info"]
    message_prefix: str = ""
    timeout: float = DEFAULT_TIMEOUT
    verify_tls: bool = True
    queue_size: int = DEFAULT_QUEUE_SIZE


def parse_webhook_config(value: Any) -> list[WebhookTarget]:
    """Validate ``--webhook_config`` (dict, list, inline JSON or file path) into targets."""
    entries = json_entries(value, "webhook_config", WebhookConfigError)
    return [_parse_entry(i, entry) for i, entry in enumerate(entries)]


def _parse_entry(index: int, entry: Any, environ: Mapping[str, str] | None = None) -> WebhookTarget:
    where = f"webhook_config[{index}]"
    if not isinstance(entry, dict):
        raise WebhookConfigError(f"{where} must be an object, got {type(entry).__name__}")
    unknown = sorted(set(entry) - KNOWN_KEYS)
    if unknown:
        raise WebhookConfigError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(KNOWN_KEYS))}")
    kind = entry.get("webhook_type")
    if kind not in TYPES:
        raise WebhookConfigError(f"{where}.webhook_type is {kind!r}; allowed: {', '.join(TYPES)}")
    url = entry.get("callback_url") or entry.get("webhook_url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        key = "callback_url" if kind == "raw" else "webhook_url"
        raise WebhookConfigError(f"{where}.{key} must be an http:// or https:// URL, got {url!r}")
    level = str(entry.get("log_level", "info")).lower()
    if level not in LEVELS:
        raise WebhookConfigError(f"{where}.log_level is {level!r}; allowed: {', '.join(LEVELS)}")
    timeout = entry.get("timeout", DEFAULT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= MAX_TIMEOUT:
        raise WebhookConfigError(f"{where}.timeout must be a number of seconds in (0, {MAX_TIMEOUT:g}]")
    queue_size = entry.get("queue_size", DEFAULT_QUEUE_SIZE)
    if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
        raise WebhookConfigError(f"{where}.queue_size must be a positive integer")
    headers = entry.get("headers", {})
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        raise WebhookConfigError(f"{where}.headers must be an object of string values")
    api_key = entry.get("api_key", entry.get("auth_token"))
    if api_key is not None and not isinstance(api_key, str):
        raise WebhookConfigError(f"{where}.api_key must be a string")
    variable = entry.get("api_key_env")
    if variable is not None:
        if api_key is not None:
            raise WebhookConfigError(f"{where}: give api_key or api_key_env, not both")
        api_key = (os.environ if environ is None else environ).get(str(variable))
        if not api_key:
            raise WebhookConfigError(f"{where}.api_key_env names ${variable}, which is not set")
    return WebhookTarget(
        kind=kind, url=url, api_key=api_key, headers={str(k): v for k, v in headers.items()},
        min_level=LEVELS[level], message_prefix=str(entry.get("message_prefix", "")),
        timeout=float(timeout), verify_tls=not bool(entry.get("ssl_no_verify", False)), queue_size=queue_size,
    )


# --- events (pure) -------------------------------------------------------------------------

def make_event(kind: str, job_id: str | None, message: str, data: dict[str, Any], severity: str = "info") -> dict:
    """One webhook event; every event has the same envelope."""
    return {
        "id": uuid.uuid4().hex,
        "type": kind,
        "severity": severity,
        "job_id": job_id,
        "timestamp": utc_now(),
        "message": message,
        "data": data,
    }


def lifecycle_event(job_id: str | None, state: TrainerState, message: str) -> dict:
    severity = "error" if state == TrainerState.FAILED else "info"
    text = f"trainer is {state}" + (f": {message}" if message else "")
    return make_event("lifecycle.stage", job_id, text, {"stage": str(state), "detail": message}, severity)


def status_event(job_id: str | None, status: TrainerStatus) -> dict:
    data = {
        "state": str(status.state), "step": status.step, "max_steps": status.max_steps,
        "epoch": status.epoch, "max_epochs": status.max_epochs, "percent": status.percent,
        "eta_seconds": status.eta_seconds, "loss": status.loss, "losses": dict(status.last_losses),
        "learning_rate": status.learning_rate, "samples_per_second": status.samples_per_second,
    }
    total = f"/{status.max_steps}" if status.max_steps else ""
    loss = f", loss {status.loss:.4g}" if status.loss is not None else ""
    eta = f", eta {format_seconds(status.eta_seconds)}" if status.eta_seconds is not None else ""
    return make_event("training.status", job_id, f"step {status.step}{total}{loss}{eta}", data)


def checkpoint_event(job_id: str | None, info: CheckpointInfo, seconds: float) -> dict:
    data = {"step": info.step, "path": info.path, "time": info.time, "complete": info.complete,
            "seconds": round(seconds, 3)}
    return make_event("training.checkpoint", job_id, f"checkpoint saved at step {info.step}", data)


def upload_event(job_id: str | None, target: str, uri: str, step: int | None) -> dict:
    what = f"checkpoint {step}" if step is not None else "final model"
    return make_event("training.upload", job_id, f"{what} uploaded to {uri}",
                      {"target": target, "uri": uri, "step": step})


def validation_event(job_id: str | None, step: int, images: Iterable[Path], seconds: float,
                     scores: dict[str, float] | None = None) -> dict:
    """``training.validation`` with the images inline (base64) and, with ``--evaluation_type clip``, the
    round's CLIP scores (``clip/mean``, ``clip/prompt/<name>``, ...)."""
    encoded = []
    for path in images:
        path = Path(path)
        mime = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
        encoded.append({"name": path.name, "mime_type": mime,
                        "base64": base64.b64encode(path.read_bytes()).decode("ascii")})
    data: dict[str, Any] = {"step": step, "seconds": round(seconds, 3), "images": encoded}
    message = f"{len(encoded)} validation image(s) at step {step}"
    if scores:
        data["scores"] = {k: round(v, 4) for k, v in scores.items()}
        if CLIP_MEAN in scores:
            message += f", CLIP score {scores[CLIP_MEAN]:.2f}"
    return make_event("training.validation", job_id, message, data)


def error_event(job_id: str | None, message: str) -> dict:
    return make_event("training.error", job_id, message, {"error": message}, "error")


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


# --- delivery ------------------------------------------------------------------------------

class _TargetWorker:
    """Background delivery to one target."""

    def __init__(self, target: WebhookTarget, on_result: Callable[[str], None]) -> None:
        self.target = target
        self._on_result = on_result
        self._queue: queue.Queue[dict | None] = queue.Queue(maxsize=target.queue_size)
        self._context = None
        if not target.verify_tls:
            self._context = ssl.create_default_context()
            self._context.check_hostname = False
            self._context.verify_mode = ssl.CERT_NONE
        self._thread = threading.Thread(target=self._loop, name=f"kubetuner-webhook-{target.kind}", daemon=True)
        self._thread.start()

    def offer(self, event: dict) -> bool:
        if event["severity"] and LEVELS.get(event["severity"], 20) < self.target.min_level:
            return False
        try:
            self._queue.put_nowait(event)
            return True
        except queue.Full:
            self._on_result("dropped")
            return False

    def close(self, deadline: float) -> None:
        """Deliver what is queued until ``deadline`` (monotonic), then give up on the rest."""
        while True:
            try:
                self._queue.put(None, timeout=max(0.01, deadline - time.monotonic()))
                break
            except queue.Full:
                if time.monotonic() >= deadline:
                    break
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            dropped = self._queue.qsize()
            log.warning("webhook %s did not drain in time; %d event(s) not sent", self.target.kind, dropped)
            for _ in range(dropped):
                self._on_result("dropped")

    def _loop(self) -> None:
        while True:
            event = self._queue.get()
            if event is None:
                return
            try:
                self._deliver(event)
                self._on_result("sent")
            except Exception as error:
                log.warning("webhook %s delivery of %s failed: %s", self.target.kind, event["type"], error)
                self._on_result("failed")

    def _deliver(self, event: dict) -> None:
        if self.target.kind == "raw":
            headers = {"Content-Type": "application/json", **self.target.headers}
            if self.target.api_key:
                headers["X-API-Key"] = self.target.api_key
            body = json.dumps(event).encode()
        else:
            body, content_type = discord_body(event, self.target.message_prefix)
            headers = {"Content-Type": content_type}
        headers.setdefault("User-Agent", "kubetuner-trainer")
        attempts = 2
        for attempt in range(attempts):
            request = urllib.request.Request(self.target.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.target.timeout, context=self._context) as reply:
                    reply.read()
                return
            except urllib.error.HTTPError as error:
                if error.code < 500 or attempt == attempts - 1:
                    raise RuntimeError(f"HTTP {error.code} from {_safe_url(self.target.url)}") from None
            except (urllib.error.URLError, OSError) as error:
                if attempt == attempts - 1:
                    raise RuntimeError(f"{_safe_url(self.target.url)} unreachable: {error}") from None
            time.sleep(0.5 * (attempt + 1))


def _safe_url(url: str) -> str:
    """The URL without its path (Discord webhook URLs carry the token in the path)."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def discord_body(event: dict, prefix: str = "") -> tuple[bytes, str]:
    """A Discord webhook request for an event: JSON, or multipart with the validation images."""
    text = f"{prefix} {event['message']}".strip() if prefix else event["message"]
    if event["job_id"]:
        text = f"[{event['job_id']}] {text}"
    payload = {"content": text[:DISCORD_LIMIT]}
    images = event["data"].get("images") if event["type"] == "training.validation" else None
    if not images:
        return json.dumps(payload).encode(), "application/json"
    boundary = uuid.uuid4().hex
    parts = [_form_part(boundary, 'name="payload_json"', "application/json", json.dumps(payload).encode())]
    for i, image in enumerate(images[:10]):  # Discord takes at most 10 files per message
        disposition = f'name="files[{i}]"; filename="{image["name"]}"'
        parts.append(_form_part(boundary, disposition, image["mime_type"], base64.b64decode(image["base64"])))
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _form_part(boundary: str, disposition: str, content_type: str, content: bytes) -> bytes:
    head = (f"--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\n"
            f"Content-Type: {content_type}\r\n\r\n")
    return head.encode() + content + b"\r\n"


class WebhookDispatcher:
    """Fans events out to every configured target and paces ``training.status`` reports."""

    def __init__(
        self,
        targets: list[WebhookTarget],
        *,
        job_id: str | None,
        reporting_interval: float | None,
        metrics: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.job_id = job_id
        self._interval = reporting_interval
        self._clock = clock
        self._metrics = metrics
        self._last_status: float | None = None
        self._counts: dict[str, int] = {"sent": 0, "failed": 0, "dropped": 0}
        self._count_lock = threading.Lock()
        self._workers = [_TargetWorker(t, self._record) for t in targets]

    @property
    def counts(self) -> dict[str, int]:
        with self._count_lock:
            return dict(self._counts)

    def _record(self, result: str) -> None:
        with self._count_lock:
            self._counts[result] += 1
        if self._metrics is not None:
            self._metrics.webhook_events.labels(result=result).inc()

    def send(self, event: dict) -> None:
        for worker in self._workers:
            worker.offer(event)

    def maybe_send_status(self, status: TrainerStatus, *, force: bool = False) -> bool:
        """Send a ``training.status`` event if the reporting interval has passed (or ``force``)."""
        now = self._clock()
        due = force or self._last_status is None or (
            self._interval is not None and now - self._last_status >= self._interval
        )
        if not due:
            return False
        self._last_status = now
        self.send(status_event(self.job_id, status))
        return True

    def close(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.close(deadline)
