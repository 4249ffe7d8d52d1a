"""Polls a trainer's ``GET /status`` (see :mod:`kubetuner_trainer.contract`).

Bounded: a short timeout per request and a few retries with backoff. An unreachable trainer is
not an error for the reconciler (the pod may be starting); it gets ``None`` and keeps the last
known progress.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from kubetuner_trainer.contract import STATUS_PATH, TrainerStatus

log = logging.getLogger(__name__)


class TrainerClient:
    def __init__(self, *, timeout: float = 2.0, retries: int = 2, backoff: float = 0.2) -> None:
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def fetch(self, host: str, port: int) -> TrainerStatus | None:
        url = f"http://{host}:{port}{STATUS_PATH}"
        for attempt in range(self.retries + 1):
            try:
                async with self._client().get(url) as resp:
                    if resp.status == 200:
                        return TrainerStatus.from_json(await resp.read())
                    log.debug("trainer status %s answered %s", url, resp.status)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                log.debug("trainer status %s unreachable: %s", url, exc)
            except (ValueError, TypeError) as exc:  # malformed document: retrying will not help
                log.warning("trainer status %s is not a valid status document: %s", url, exc)
                return None
            if attempt < self.retries:
                await asyncio.sleep(self.backoff * 2**attempt)
        return None
