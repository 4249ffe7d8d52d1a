"""A small async Kubernetes API client for the handful of calls the reconciler makes.

Built from the same :class:`kopf.ConnectionInfo` kopf logs in with, so the operator has a single
notion of "the cluster". Transient failures (connection errors, 429, 5xx) are retried with
exponential backoff; everything else raises :class:`ApiError` with the server's message.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import aiohttp

from .builders.jobset import JOBSET_API_VERSION, JOBSET_PLURAL
from .spec import GROUP, PLURAL, VERSION

RESOURCES: dict[str, tuple[str, str]] = {  # kind -> (API prefix, plural)
    "Pod": ("/api/v1", "pods"),
    "PersistentVolumeClaim": ("/api/v1", "persistentvolumeclaims"),
    "Service": ("/api/v1", "services"),
    "Event": ("/api/v1", "events"),
    "Job": ("/apis/batch/v1", "jobs"),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies"),
    "JobSet": (f"/apis/{JOBSET_API_VERSION}", JOBSET_PLURAL),
    "TrainingJob": (f"/apis/{GROUP}/{VERSION}", PLURAL),
}
# Cluster-scoped kinds the operator touches: kind -> collection path.
CLUSTER_RESOURCES: dict[str, str] = {
    "ValidatingWebhookConfiguration": "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations",
}
MERGE_PATCH = "application/merge-patch+json"


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason

    @property
    def transient(self) -> bool:
        return self.status == 429 or self.status >= 500


def collection_path(kind: str, namespace: str) -> str:
    prefix, plural = RESOURCES[kind]
    return f"{prefix}/namespaces/{namespace}/{plural}"


def object_path(kind: str, namespace: str, name: str) -> str:
    return f"{collection_path(kind, namespace)}/{name}"


def _matches(obj: Mapping[str, Any], selector: Mapping[str, str]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


class KubeApi:
    """get / list / create-or-get / merge-patch / delete over one aiohttp session."""

    def __init__(self, server: str, session: aiohttp.ClientSession, *, retries: int = 4,
                 backoff: float = 0.2) -> None:
        self.server = server.rstrip("/")
        self.session = session
        self.retries = retries
        self.backoff = backoff

    @classmethod
    def from_connection_info(cls, info: Any, **options: Any) -> KubeApi:
        """From a ``kopf.ConnectionInfo`` (server, CA, token or client certificate); ``options`` as ``__init__``."""
        connector = aiohttp.TCPConnector(limit=64, ssl=info.as_ssl_context())
        session = aiohttp.ClientSession(connector=connector, headers=info.as_http_headers(),
                                        timeout=aiohttp.ClientTimeout(total=30))
        return cls(info.server, session, **options)

    async def close(self) -> None:
        await self.session.close()

    async def _request(self, method: str, path: str, *, body: Any = None, params: Mapping[str, str] | None = None,
                       content_type: str = "application/json") -> Any:
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if body is not None else {}
        for attempt in range(self.retries + 1):
            try:
                async with self.session.request(method, self.server + path, data=data, params=params,
                                                headers=headers) as resp:
                    text = await resp.text()
                    if resp.status < 400:
                        return json.loads(text) if text else {}
                    try:
                        payload = json.loads(text)
                    except ValueError:
                        payload = {}
                    error = ApiError(resp.status, str(payload.get("reason", resp.reason)),
                                     str(payload.get("message", text[:200])))
            except (TimeoutError, aiohttp.ClientError) as exc:
                error = ApiError(599, type(exc).__name__, str(exc))
            if not error.transient or attempt == self.retries:
                raise error
            await asyncio.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self._request("GET", object_path(kind, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(self, kind: str, namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        result = await self._request("GET", collection_path(kind, namespace), params={"labelSelector": selector})
        # Filter here as well: some API emulators ignore label selectors.
        return [item for item in result.get("items", []) if _matches(item, labels)]

    async def create(self, obj: Mapping[str, Any]) -> bool:
        """Create ``obj``; False when an object of that name exists already (idempotent create)."""
        meta = obj["metadata"]
        try:
            await self._request("POST", collection_path(obj["kind"], meta["namespace"]), body=obj)
        except ApiError as exc:
            if exc.status == 409:
                return False
            raise
        return True

    async def patch(self, kind: str, namespace: str, name: str, patch: Mapping[str, Any], *,
                    subresource: str | None = None) -> dict[str, Any]:
        path = object_path(kind, namespace, name) + (f"/{subresource}" if subresource else "")
        return await self._request("PATCH", path, body=patch, content_type=MERGE_PATCH)

    async def serves(self, kind: str) -> bool:
        """Whether the API server serves ``kind`` (RESOURCES), by API discovery (no RBAC needed).

        Raises ApiError when discovery itself fails (other than 404, which means "not served").
        """
        prefix, plural = RESOURCES[kind]
        try:
            found = await self._request("GET", prefix)
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return any(r.get("name") == plural for r in found.get("resources") or ())

    async def get_cluster(self, kind: str, name: str) -> dict[str, Any]:
        """A cluster-scoped object (CLUSTER_RESOURCES); ApiError when missing."""
        return await self._request("GET", f"{CLUSTER_RESOURCES[kind]}/{name}")

    async def patch_cluster(self, kind: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        return await self._request("PATCH", f"{CLUSTER_RESOURCES[kind]}/{name}", body=patch,
                                   content_type=MERGE_PATCH)

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete (background propagation); False when it was gone already."""
        try:
            await self._request("DELETE", object_path(kind, namespace, name),
                                params={"propagationPolicy": "Background"})
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True
