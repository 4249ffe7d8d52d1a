"""The trainer's termination message: its final status, left where Kubernetes keeps it.

Polling ``GET /status`` misses whatever happens between the operator's last poll and the
pod's exit: the final checkpoint, the checkpoint written on SIGTERM, the last loss. So at every
exit the trainer also writes its final :class:`~kubetuner_trainer.contract.TrainerStatus` as
compact JSON to the file named by ``KUBETUNER_TERMINATION_LOG`` (the pod's
``terminationMessagePath``). The kubelet copies that file into
``status.containerStatuses[].state.terminated.message``, and the operator reads it back with
:func:`from_termination_message` and treats it like one more poll.

The kubelet keeps at most 4096 bytes, so :func:`termination_message` trims: first the
``message`` text, then the oldest checkpoints (complete ones outlive incomplete ones). Secret
values from the environment and credentials inside URLs are masked before anything is written.

Torch-free and dependency-free like :mod:`kubetuner_trainer.contract`: the operator imports it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from .contract import CheckpointInfo, TrainerState, TrainerStatus

log = logging.getLogger(__name__)

TERMINATION_LOG_ENV = "KUBETUNER_TERMINATION_LOG"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
# The kubelet keeps at most this many bytes of a container's termination message.
KUBELET_MESSAGE_LIMIT = 4096
# ``message`` is cut to this many characters first, then to the second figure if still too big.
MESSAGE_TEXT_LIMITS = (1024, 256)
CONFIG_ERROR_PREFIX = "configuration error: "
MASK = "***"
# Environment values shorter than this are not masked: they would mangle ordinary text.
MIN_SECRET_LENGTH = 6
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of environment variables whose names mark them as secrets (tokens, keys, passwords)."""
    from .config.trainer_config import SECRET_HINTS  # same hints as the config redaction

    env = os.environ if environ is None else environ
    found = {value for name, value in env.items()
             if len(value) >= MIN_SECRET_LENGTH and any(h in name.lower() for h in SECRET_HINTS)}
    return sorted(found, key=len, reverse=True)  # longest first: a secret containing another


def mask_secrets(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every given secret value and every ``user:password@`` of a URL masked."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return _URL_CREDENTIALS.sub(lambda m: m.group("scheme") + MASK + "@", text)


def _shorten(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[: max(0, limit - 1)] + "…" if limit > 0 else ""


def _encode(status: TrainerStatus) -> bytes:
    return json.dumps(status.to_dict(), sort_keys=True, separators=(",", ":")).encode()


def _by_priority(checkpoints: Iterable[CheckpointInfo]) -> list[CheckpointInfo]:
    """Complete checkpoints newest first, then the incomplete ones newest first."""
    return sorted(checkpoints, key=lambda c: (not c.complete, -c.step))


def _most_that_fit(build: Callable[[int], TrainerStatus], count: int, limit: int) -> TrainerStatus | None:
    """``build(k)`` for the largest ``k`` in ``1..count`` whose encoding is under ``limit`` bytes."""
    low, high, best = 1, count, None
    while low <= high:  # the size grows with k, so bisect
        middle = (low + high) // 2
        candidate = build(middle)
        if len(_encode(candidate)) < limit:
            best, low = candidate, middle + 1
        else:
            high = middle - 1
    return best


def _candidates(status: TrainerStatus, limit: int) -> Iterator[TrainerStatus]:
    ranked = _by_priority(status.checkpoints)

    def keeping(message: str) -> Callable[[int], TrainerStatus]:
        return lambda k: replace(status, message=message,
                                 checkpoints=tuple(sorted(ranked[:k], key=lambda c: c.step)))

    for text_limit in (*MESSAGE_TEXT_LIMITS, 0):
        message = _shorten(status.message, text_limit)
        if not ranked:
            yield replace(status, message=message)
            continue
        best = _most_that_fit(keeping(message), len(ranked), limit)
        if best is not None:
            yield best
    yield replace(status, message="", checkpoints=())
    yield replace(status, message="", checkpoints=(), last_losses={}, job_id=None)


def termination_message(status: TrainerStatus, *, limit: int = KUBELET_MESSAGE_LIMIT,
                        secrets: Iterable[str] = ()) -> str:
    """``status`` as compact JSON of fewer than ``limit`` bytes, secrets masked.

    What does not fit is dropped in this order: ``message`` beyond 1024 and then 256
    characters, the oldest incomplete and then the oldest complete checkpoints, the rest of
    ``message``, every checkpoint, the loss components and the job id.
    """
    secrets = list(secrets)
    clean = replace(
        status,
        message=mask_secrets(status.message, secrets),
        job_id=mask_secrets(status.job_id, secrets) if status.job_id else status.job_id,
        checkpoints=tuple(replace(c, path=mask_secrets(c.path, secrets)) for c in status.checkpoints),
    )
    for candidate in _candidates(clean, limit):
        data = _encode(candidate)
        if len(data) < limit:
            return data.decode()
    raise ValueError(f"a termination message cannot be made smaller than {limit} bytes")


def termination_log_path(environ: Mapping[str, str] | None = None) -> Path | None:
    """Where to write the message: ``$KUBETUNER_TERMINATION_LOG``, or ``None`` when unset."""
    env = os.environ if environ is None else environ
    value = env.get(TERMINATION_LOG_ENV, "").strip()
    return Path(value) if value else None


def write_termination_message(status: TrainerStatus, path: Path | None = None, *,
                              environ: Mapping[str, str] | None = None) -> Path | None:
    """Write ``status`` to ``path`` (default: ``$KUBETUNER_TERMINATION_LOG``); returns the file written.

    Does nothing when no path is configured. Never raises for I/O problems: the process is
    exiting and its exit code matters more than the message, so a failure is only logged.
    """
    target = path if path is not None else termination_log_path(environ)
    if target is None:
        return None
    try:
        text = termination_message(status, secrets=secret_values(environ))
        # Not atomic on purpose: /dev/termination-log is a file the kubelet mounts; it cannot be replaced.
        with open(target, "w", encoding="utf-8") as handle:
            handle.write(text)
    except (OSError, ValueError) as error:
        log.warning("could not write the termination message to %s: %s", target, error)
        return None
    return target


def from_termination_message(text: str | bytes | None) -> TrainerStatus | None:
    """The status in a container's termination message; ``None`` for anything else.

    Tolerant on purpose: an empty message, plain text (an older trainer, a crash before the
    runtime started), truncated JSON or a document of a newer contract version all give ``None``.
    """
    if not text:
        return None
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or "state" not in data:
            return None
        status = TrainerStatus.from_dict(data)
        if not isinstance(status.step, int) or not isinstance(status.message, str):
            return None
        return replace(status, checkpoints=tuple(c for c in status.checkpoints
                                                 if isinstance(c.step, int) and isinstance(c.path, str)))
    except (ValueError, TypeError, AttributeError):
        return None


def read_termination_message(path: Path | None = None, *,
                             environ: Mapping[str, str] | None = None) -> TrainerStatus | None:
    """The status already written to the termination log (``None`` when none or unreadable)."""
    target = path if path is not None else termination_log_path(environ)
    if target is None:
        return None
    try:
        return from_termination_message(target.read_bytes())
    except OSError:
        return None


def _utc_now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def config_error_status(problems: str, previous: TrainerStatus | None = None, *,
                        job_id: str | None = None) -> TrainerStatus:
    """The final status of a run that ended with a configuration error (exit 78).

    ``previous`` is what the runtime already reported (progress, checkpoints), if it started;
    the state becomes ``failed`` and the message names the problems.
    """
    base = previous if previous is not None else TrainerStatus(job_id=job_id)
    detail = problems.strip() or base.message.strip() or "the trainer rejected its configuration"
    if detail.startswith(CONFIG_ERROR_PREFIX):
        detail = detail[len(CONFIG_ERROR_PREFIX):]
    return replace(base, state=TrainerState.FAILED, message=CONFIG_ERROR_PREFIX + detail, updated_at=_utc_now())


def record_config_error(problems: str, *, environ: Mapping[str, str] | None = None) -> Path | None:
    """Leave a ``failed`` termination message for a configuration error (no-op when not configured)."""
    env = os.environ if environ is None else environ
    path = termination_log_path(env)
    if path is None:
        return None
    status = config_error_status(problems, read_termination_message(path),
                                 job_id=env.get("SIMPLETUNER_JOB_ID") or None)
    return write_termination_message(status, path, environ=env)
