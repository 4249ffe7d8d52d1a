"""Polls a trainer's ``GET /status`` (see :mod:`kubetuner_trainer.contract`).

Bounded: every fetch, retries included, ends within ``budget`` seconds, so one hanging
trainer never holds up the reconcile (or the poll slot) of another job. An unreachable
trainer is not an error for the reconciler (the pod may be starting); it gets ``None`` and
keeps the last known progress. A document that does not follow the contract is "no status"
too; it is logged once per endpoint until that endpoint answers a valid document again.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from kubetuner_trainer.contract import STATUS_PATH, TrainerStatus

log = logging.getLogger(__name__)


class TrainerClient:
    """``fetch(host, port)``: the trainer's status or ``None``; ``timeout`` is per request (seconds)."""

    def __init__(self, *, timeout: float = 2.0, retries: int = 2, backoff: float = 0.2,
                 budget: float | None = None) -> None:
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        # Whole fetch, retries and backoff included; by default what the retries need at most.
        self.budget = budget if budget is not None else (retries + 1) * timeout + backoff * (2**retries)
        self._session: aiohttp.ClientSession | None = None
        self._invalid: set[str] = set()  # endpoints whose invalid document was logged already

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No connection cap here: the poll loop bounds concurrency, and a pool shared by
            # every job would let a few hanging trainers starve the others.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                                  timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def fetch(self, host: str, port: int) -> TrainerStatus | None:
        """The trainer's status; ``None`` when unreachable, failing or invalid within the budget."""
        url = f"http://{host}:{port}{STATUS_PATH}"
        try:
            async with asyncio.timeout(self.budget):
                return await self._fetch(url)
        except TimeoutError:
            log.debug("trainer status %s: no answer within %.1fs", url, self.budget)
            return None

    async def _fetch(self, url: str) -> TrainerStatus | None:
        for attempt in range(self.retries + 1):
            try:
                async with self._client().get(url) as resp:
                    if resp.status == 200:
                        body = await resp.read()
                        return self._parse(url, body)
                    log.debug("trainer status %s answered %s", url, resp.status)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                log.debug("trainer status %s unreachable: %s", url, exc)
            if attempt < self.retries:
                await asyncio.sleep(self.backoff * 2**attempt)
        return None

    def _parse(self, url: str, body: bytes) -> TrainerStatus | None:
        try:
            status = TrainerStatus.from_json(body)
        except ValueError as exc:  # malformed: retrying will not help (JSONDecodeError is a ValueError)
            if url not in self._invalid:
                self._invalid.add(url)
                log.warning("trainer status %s is not a valid status document (treated as no status): %s",
                            url, exc)
            return None
        self._invalid.discard(url)
        return status
