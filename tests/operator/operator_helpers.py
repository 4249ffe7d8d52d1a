"""Shared fixtures of the operator tests: TrainingJob factories, the emulated API server, the operator."""

from __future__ import annotations

import asyncio
import collections
import contextvars
import copy
import itertools
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import kmock
import kopf
import pytest
from aiohttp import web

from kubetuner_operator.handlers import OperatorSettings, Reconciler, run_operator
from kubetuner_operator.kube_api import KubeApi
from kubetuner_trainer.contract import CheckpointInfo, TrainerStatus
from kubetuner_trainer.options import get_registry

#: a switch of the spec that kubetuner has not built (derived, so it moves on as features land); every
#: model family of the spec is built now, so an unbuilt feature stands for "valid in SimpleTuner, not built"
UNBUILT_OPTION = next(o.name for o in get_registry() if o.type == "bool" and not o.implemented)

TRAININGJOB_UID = "0b0e8a7c-5d2f-4a53-9a8e-3f1c2b7d9e01"


def make_trainingjob(name: str = "sdxl-style", namespace: str = "team-a", **spec_overrides: Any) -> dict[str, Any]:
    """A realistic TrainingJob object (as stored by the API server) with selected spec keys replaced."""
    spec: dict[str, Any] = {
        "image": "ghcr.io/kubetuner/trainer:0.1.0",
        "model": {"family": "sdxl", "type": "lora",
                  "source": {"hub": {"id": "stabilityai/stable-diffusion-xl-base-1.0", "variant": "fp16"}}},
        "config": {"learning_rate": 1e-4, "optimizer": "adamw_bf16", "max_train_steps": 2000,
                   "checkpoint_step_interval": 250},
        "datasets": [
            {"id": "style-images", "type": "aws", "aws_bucket_name": "training-data", "aws_data_prefix": "style/",
             "aws_endpoint_url": "https://minio.example:9000", "credentialsSecret": {"name": "s3-creds"},
             "resolution": 1024, "resolution_type": "pixel_area", "caption_strategy": "textfile"},
            {"id": "local.set", "type": "local", "pvc": {"claimName": "datasets", "path": "portraits"},
             "caption_strategy": "filename", "instance_data_dir": "/home/me/portraits"},
        ],
        "resources": {"gpus": 1, "gpuResourceName": "nvidia.com/gpu", "cpu": "8", "memory": "64Gi",
                      "sharedMemory": "16Gi"},
        "caches": {"models": {"existingClaim": "hf-models"}, "latents": {"size": "100Gi"}},
        "output": {"pvc": {"size": "50Gi", "storageClassName": "fast"}},
        "hooks": {"maxConcurrent": 2, "postCheckpoint": [
            {"name": "eval", "image": "ghcr.io/acme/eval:1",
             "command": ["python", "-m", "eval", "--checkpoint", "{local_checkpoint_path}", "--step", "{global_step}"],
             "env": [{"name": "MODE", "value": "quick"}], "resources": {"limits": {"cpu": "2"}}, "backoffLimit": 1}]},
        "secrets": {"huggingFaceToken": {"name": "hf", "key": "token"},
                    "env": [{"name": "WANDB_API_KEY", "secretKeyRef": {"name": "wandb", "key": "api-key"}}]},
        "runPolicy": {"backoffLimit": 3},
        "metricsPort": 9400,
    }
    for key, value in spec_overrides.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = copy.deepcopy(value)
    return {"apiVersion": "kubetuner.dev/v1alpha1", "kind": "TrainingJob",
            "metadata": {"name": name, "namespace": namespace, "uid": TRAININGJOB_UID, "generation": 1},
            "spec": spec}


def mounted_files(pod: dict[str, Any]) -> dict[str, str]:
    """The files of a trainer pod's config volume as the kubelet writes them: downwardAPI items, each
    the value of the pod annotation its fieldRef names (what the container finds in its config folder)."""
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == "config"]
    annotations = pod["metadata"].get("annotations") or {}
    files = {}
    for item in volume["downwardAPI"]["items"]:
        path = item["fieldRef"]["fieldPath"]
        prefix = "metadata.annotations['"
        assert path.startswith(prefix) and path.endswith("']"), path
        files[item["path"]] = annotations[path[len(prefix):-2]]
    return files


def trainer_files(job: Any) -> dict[str, str]:
    """config.json and multidatabackend.json as the first trainer pod of ``job`` (a parsed spec) sees them."""
    from kubetuner_operator.builders import build_trainer_pod

    return mounted_files(build_trainer_pod(job, 0, resume=False))


@pytest.fixture
def trainingjob() -> dict[str, Any]:
    return make_trainingjob()


# ---------------------------------------------------------------- the emulated cluster




CRD_RESOURCE = "apiextensions.k8s.io/v1/customresourcedefinitions"
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}
BUILTIN_RESOURCES = {
    "v1/pods": kmock.ResourceInfo(kind="Pod", singular="pod", namespaced=True, subresources={"status"}, verbs=VERBS),
    "v1/configmaps": kmock.ResourceInfo(kind="ConfigMap", singular="configmap", namespaced=True, verbs=VERBS),
    "v1/persistentvolumeclaims": kmock.ResourceInfo(kind="PersistentVolumeClaim", namespaced=True, verbs=VERBS),
    "v1/services": kmock.ResourceInfo(kind="Service", singular="service", namespaced=True, verbs=VERBS),
    "v1/events": kmock.ResourceInfo(kind="Event", singular="event", namespaced=True, verbs=VERBS),
    "v1/namespaces": kmock.ResourceInfo(kind="Namespace", singular="namespace", namespaced=False, verbs=VERBS),
    "batch/v1/jobs": kmock.ResourceInfo(kind="Job", singular="job", namespaced=True, subresources={"status"}, verbs=VERBS),
    "networking.k8s.io/v1/networkpolicies": kmock.ResourceInfo(kind="NetworkPolicy", singular="networkpolicy",
                                                               namespaced=True, verbs=VERBS),
    CRD_RESOURCE: kmock.ResourceInfo(kind="CustomResourceDefinition", namespaced=False, verbs=VERBS),
}


_CURRENT_REQUEST: contextvars.ContextVar[Any] = contextvars.ContextVar("current_request")


class _CurrentRequestOnly(list):  # type: ignore[type-arg]
    """kmock's request log, reduced to a count plus the request being served (per task)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def append(self, item: Any) -> None:
        self.count += 1

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Any:
        current = _CURRENT_REQUEST.get(None)
        return iter([] if current is None else [current])


def _merged(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch of ``patch`` onto ``target`` (a new value; ``target`` is not changed)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merged(out.get(k), v)
    return out


@dataclass
class Failure:
    """An injected API error (see :meth:`ApiServer.fail`); ``seen`` counts the requests it answered."""

    status: int
    message: str
    times: int | None
    seen: int = 0


class ApiServer(kmock.KubernetesEmulator):
    """kmock's emulator plus the bits of the real API server these tests rely on.

    * metadata.uid / creationTimestamp / generation on create; generation + 1 when spec changes;
    * garbage collection: objects whose every owner (by uid) is gone are deleted, like the
      kube-controller-manager's background cascading deletion;
    * a record of every successful create, to prove that nothing was created twice;
    * ``lose_create_responses``: store an object but answer 504, as when a client times out;
    * equality label selectors on lists;
    * no request history: kmock matches every request against every request it has seen, which
      makes long runs (the scale benchmark) quadratic; here each request is matched against itself
      only. Nothing asserts on old requests (``created`` is the record that matters).
    """

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.created: list[tuple[str, str, str]] = []
        self.created_at: dict[tuple[str, str, str], float] = {}  # time.monotonic() of each create
        self._requests = _CurrentRequestOnly()
        self.lose_create_responses: dict[str, int] = {}  # plural -> creates whose response is lost
        self.failures: dict[tuple[str, str], Failure] = {}  # (action, plural) -> injected error
        self.requests: collections.Counter[str] = collections.Counter()  # "create pods" -> count
        self._index: dict[Any, dict[tuple[Any, str | None, str], None]] = {}  # resource -> object keys

    async def _handle(self, request):  # type: ignore[no-untyped-def]
        _CURRENT_REQUEST.set(request)
        if request.resource is not None and request.action is not None:
            self.requests[f"{str(request.action.name).lower()} {request.resource.plural}"] += 1
        return await self._handle_tracked(request)

    def fail(self, action: str, plural: str, status: int, message: str = "injected by the test", *,
             times: int | None = None) -> Failure:
        """Answer the next ``times`` (None: every) ``action`` ("create", "patch", ...) requests on ``plural``
        with ``status`` and a Status document, before touching any object: an outage window
        measured in requests, not seconds."""
        failure = Failure(status, message, times)
        self.failures[(action, plural)] = failure
        return failure

    def _injected(self, request):  # type: ignore[no-untyped-def]
        if request.resource is None or request.action is None:
            return None
        failure = self.failures.get((str(request.action.name).lower(), request.resource.plural))
        if failure is None or failure.times == 0:
            return None
        failure.seen += 1
        if failure.times is not None:
            failure.times -= 1
        reason = {400: "BadRequest", 403: "Forbidden", 422: "Invalid", 500: "InternalError",
                  503: "ServiceUnavailable"}.get(failure.status, "Error")
        return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": failure.status,
                                  "reason": reason, "message": failure.message}, status=failure.status)

    async def _handle_tracked(self, request):  # type: ignore[no-untyped-def]
        injected = self._injected(request)
        if injected is not None:
            return injected
        if request.resource is not None and request.action == kmock.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
            meta.setdefault("generation", 1)
            meta.setdefault("namespace", request.namespace)
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if request.resource is not None and request.action == kmock.action.UPDATE and request.name \
                and not request.subresource:
            key = (request.resource, request.namespace, request.name)
            if key in self.objects and not self.objects[key].deleted and isinstance(request.data, dict) \
                    and "spec" in request.data:
                # Bump generation in the same write as the spec, so the watch event carries it.
                raw = self.objects[key].raw
                if _merged(raw.get("spec"), request.data["spec"]) != raw.get("spec"):
                    meta = request.data.setdefault("metadata", {})
                    meta["generation"] = int(raw["metadata"].get("generation", 1)) + 1
        response = await super()._handle(request)
        created_now = (request.resource is not None and request.action == kmock.action.CREATE
                       and response.status < 300)
        if created_now:
            created = (request.resource.plural, request.namespace or "", request.data["metadata"]["name"])
            self._index.setdefault(request.resource, {})[
                (request.resource, request.namespace or request.data["metadata"].get("namespace"),
                 request.data["metadata"]["name"])] = None
            self.created.append(created)
            self.created_at.setdefault(created, time.monotonic())
        if created_now and self.lose_create_responses.get(request.resource.plural, 0) > 0:
            # The object is stored, but the client never learns it: as after a timeout or a crash.
            self.lose_create_responses[request.resource.plural] -= 1
            return web.json_response({"kind": "Status", "apiVersion": "v1", "code": 504, "reason": "Timeout",
                                      "message": "response lost on purpose by the test"}, status=504)
        if request.action == kmock.action.DELETE:
            await self._collect_garbage()
        return response

    async def _serve_fetch(self, request):  # type: ignore[no-untyped-def]
        """By key, not by scanning every object (kmock scans; the benchmark holds thousands)."""
        key = (request.resource, request.namespace, request.name)
        if request.resource not in self._index or key not in self._index[request.resource]:
            return await super()._serve_fetch(request)
        obj = self.objects[key]
        if obj.deleted:
            raise kmock.KubernetesObjectNotFoundError()
        return obj.raw

    async def _serve_list(self, request):  # type: ignore[no-untyped-def]
        """Lists honour equality label selectors, as the real API server does."""
        if request.resource in self._index:
            result = {"metadata": {"resourceVersion": "..."}, "items": [
                self.objects[key].raw for key in list(self._index[request.resource])
                if (request.namespace is None or key[1] == request.namespace) and not self.objects[key].deleted]}
        else:
            result = await super()._serve_list(request)
        selector = dict(term.split("=", 1) for term in (request.params.get("labelSelector") or "").split(",")
                        if "=" in term)
        if selector:
            result["items"] = [item for item in result["items"] if all(
                (item.get("metadata", {}).get("labels") or {}).get(k) == v for k, v in selector.items())]
        return result

    async def _collect_garbage(self) -> None:
        while True:
            live = {obj.raw["metadata"].get("uid") for obj in self.objects.values() if not obj.deleted}
            orphans = [(k, obj) for k, obj in self.objects.items() if not obj.deleted
                       and obj.raw["metadata"].get("ownerReferences")
                       and not any(ref.get("uid") in live for ref in obj.raw["metadata"]["ownerReferences"])]
            if not orphans:
                return
            for (resource, _, _), obj in orphans:
                raw = obj.raw
                obj.delete()
                await self._buses[resource].put({"type": "DELETED", "object": raw})

    # -- helpers for tests -------------------------------------------------------------------
    def live(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        res = kmock.resource(resource)
        return [obj.raw for (r, ns, _), obj in list(self.objects.items())
                if r == res and not obj.deleted and (namespace is None or ns == namespace)]

    def get(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        return next((o for o in self.live(resource, namespace) if o["metadata"]["name"] == name), None)


def register_crd(server: ApiServer) -> dict[str, Any]:
    """Store the generated CRD and serve its resource in discovery, as the API server would."""
    from kubetuner_operator.crd.schema import build_crd

    crd = build_crd()
    server.objects[kmock.resource(CRD_RESOURCE), None, crd["metadata"]["name"]] = crd
    names = crd["spec"]["names"]
    for version in crd["spec"]["versions"]:
        server.resources[f"{crd['spec']['group']}/{version['name']}/{names['plural']}"] = kmock.ResourceInfo(
            kind=names["kind"], singular=names.get("singular"), namespaced=crd["spec"]["scope"] == "Namespaced",
            shortnames=set(names.get("shortNames", ())), categories=set(names.get("categories", ())),
            subresources=set(version.get("subresources", {})),
            verbs=VERBS)
    return crd


class FakeTrainer:
    """Serves the trainer contract's GET /status on loopback (stands in for the trainer runtime)."""

    def __init__(self) -> None:
        self.status = TrainerStatus()
        self.raw: str | None = None  # served instead of ``status`` (a document off the contract)
        self.hang = False  # accept requests and never answer them (until the server stops)
        self.hits = 0
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._stopped = asyncio.Event()

    async def _status(self, _: web.Request) -> web.Response:
        self.hits += 1
        if self.hang:
            await self._stopped.wait()
        return web.Response(text=self.raw if self.raw is not None else self.status.to_json(),
                            content_type="application/json")

    async def __aenter__(self) -> FakeTrainer:
        app = web.Application()
        app.router.add_get("/status", self._status)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *_: Any) -> None:
        assert self._runner is not None
        self._stopped.set()
        await self._runner.cleanup()


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class Cluster:
    server: ApiServer
    url: str
    client: KubeApi
    clock: FakeClock
    operators: list[tuple[Reconciler, threading.Thread, threading.Event]] = field(default_factory=list)
    _nudges: int = 0

    @property
    def reconciler(self) -> Reconciler:
        return self.operators[-1][0]

    async def start_operator(self, poll_interval: float = 0.2, trainer_timeout: float = 1.0,
                             **settings_overrides: Any) -> Reconciler:
        """Start the real operator (its own thread and loop); ``settings_overrides``: more OperatorSettings."""
        url = self.url
        settings = OperatorSettings(login=lambda **_: kopf.ConnectionInfo(server=url), poll_interval=poll_interval,
                                    metrics_port=0, metrics_host="127.0.0.1", trainer_timeout=trainer_timeout,
                                    clock=self.clock, api_backoff=0.01, **settings_overrides)
        reconciler = Reconciler(settings)
        stop, ready = threading.Event(), threading.Event()
        # Its own thread and event loop, as in a real deployment: kopf owns the loop it runs in.
        thread = threading.Thread(target=asyncio.run, daemon=True, name="operator",
                                  args=(run_operator(settings, stop_flag=stop, ready_flag=ready, reconciler=reconciler),))
        thread.start()
        self.operators.append((reconciler, thread, stop))
        await eventually(lambda: ready.is_set() and reconciler.connection is not None, "operator ready")
        return reconciler

    async def stop_operator(self) -> None:
        _, thread, stop = self.operators.pop()
        stop.set()
        await asyncio.to_thread(thread.join, 30)
        assert not thread.is_alive(), "the operator did not stop within 30 s"

    def reconcile_count(self) -> float:
        return _histogram_count(self.reconciler.metrics.reconcile_seconds)

    async def reconciles(self, count: int = 3, start: float | None = None) -> None:
        """Wait until the running operator finished ``count`` more reconciles than ``start``
        (default: now) (no fixed sleeps)."""
        start = self.reconcile_count() if start is None else start
        await eventually(lambda: self.reconcile_count() >= start + count, f"{count} reconciles")


    async def nudge(self, name: str, times: int = 3, namespace: str = "team-a") -> None:
        """Make the operator reconcile ``name`` ``times`` more times by touching an annotation
        (a watch event, as any metadata change by a user or another controller would cause)."""
        for _ in range(times):
            self._nudges += 1
            start = self.reconcile_count()
            await self.client.patch("TrainingJob", namespace, name,
                                    {"metadata": {"annotations": {"test.kubetuner.dev/nudge": str(self._nudges)}}})
            await self.reconciles(1, start)


def _histogram_count(histogram: Any) -> float:
    for metric in histogram.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count"):
                return sample.value
    return 0.0


async def eventually(probe: Callable[[], Any] | Callable[[], Awaitable[Any]], what: str,
                     timeout: float = 30.0) -> Any:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    for _ in itertools.count():
        last = probe()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last value: {last!r}")
        await asyncio.sleep(0.02)


@asynccontextmanager
async def emulated_cluster() -> AsyncIterator[Cluster]:
    async with ApiServer() as server, kmock.Server(server) as http:
        for name, info in BUILTIN_RESOURCES.items():
            server.resources[name] = info
        register_crd(server)
        url = str(http.url).rstrip("/")
        session = aiohttp.ClientSession()
        cluster = Cluster(server=server, url=url, client=KubeApi(url, session), clock=FakeClock())
        try:
            yield cluster
        finally:
            while cluster.operators:
                await cluster.stop_operator()
            await session.close()


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with emulated_cluster() as c:
        yield c


# ---------------------------------------------------------------- reading and driving the emulated cluster

NS = "team-a"
TJ = "kubetuner.dev/v1alpha1/trainingjobs"


def pods(cluster: Cluster, job: str = "sdxl-style") -> dict[str, dict[str, Any]]:
    return {p["metadata"]["name"]: p for p in cluster.server.live("v1/pods", NS)
            if p["metadata"]["labels"].get("kubetuner.dev/job") == job}


def jobs(cluster: Cluster, job: str = "sdxl-style") -> dict[str, dict[str, Any]]:
    return {j["metadata"]["name"]: j for j in cluster.server.live("batch/v1/jobs", NS)
            if j["metadata"]["labels"].get("kubetuner.dev/job") == job}


def status(cluster: Cluster, name: str = "sdxl-style") -> dict[str, Any]:
    return (cluster.server.get(TJ, NS, name) or {}).get("status") or {}


def assert_status_fits_crd(cluster: Cluster, name: str = "sdxl-style") -> None:
    """The status the operator wrote passes the CRD's status schema, unknown fields included
    (a real API server would silently prune fields the schema does not declare)."""
    from kubetuner_operator.crd.schema import trainingjob_openapi_schema
    from kubetuner_operator.crd.validation import validate_value

    schema = trainingjob_openapi_schema()["properties"]["status"]
    assert validate_value(status(cluster, name), schema, "status", strict=True) == []


def condition(cluster: Cluster, ctype: str, name: str = "sdxl-style") -> dict[str, Any]:
    return next((c for c in status(cluster, name).get("conditions", []) if c["type"] == ctype), {})


def events(cluster: Cluster, name: str = "sdxl-style") -> list[dict[str, Any]]:
    return [e for e in cluster.server.live("v1/events", NS) if e.get("involvedObject", {}).get("name") == name]


def printer_columns(cluster: Cluster, name: str = "sdxl-style") -> dict[str, Any]:
    """Evaluate the CRD's printer columns (simple .a.b paths) on the stored object, like kubectl."""
    crd = cluster.server.live("apiextensions.k8s.io/v1/customresourcedefinitions")[0]
    obj = cluster.server.get(TJ, NS, name) or {}
    out = {}
    for column in crd["spec"]["versions"][0].get("additionalPrinterColumns", []):
        value: Any = obj
        for part in column["jsonPath"].strip(".").split("."):
            value = value.get(part) if isinstance(value, dict) else None
        out[column["name"]] = value
    return out


async def create(cluster: Cluster, obj: dict[str, Any]) -> None:
    obj = dict(obj)
    obj["metadata"] = {k: v for k, v in obj["metadata"].items() if k not in ("uid", "generation")}
    assert await cluster.client.create(obj)


async def patch_spec(cluster: Cluster, name: str, spec: dict[str, Any]) -> None:
    await cluster.client.patch("TrainingJob", NS, name, {"spec": spec})


async def set_pod_status(cluster: Cluster, name: str, pod_status: dict[str, Any]) -> None:
    await cluster.client.patch("Pod", NS, name, {"status": pod_status}, subresource="status")


def running() -> dict[str, Any]:
    return {"phase": "Running", "podIP": "127.0.0.1", "startTime": "2026-01-01T00:00:00Z",
            "containerStatuses": [{"name": "trainer", "state": {"running": {}}}]}


def terminated(code: int, message: str = "") -> dict[str, Any]:
    return {"phase": "Failed" if code else "Succeeded",
            "containerStatuses": [{"name": "trainer", "state": {"terminated": {"exitCode": code,
                                                                               "message": message}}}]}


def evicted() -> dict[str, Any]:
    return {"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory.",
            "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet"}]}


def checkpoint(step: int) -> CheckpointInfo:
    return CheckpointInfo(step, f"/workspace/output/checkpoint-{step}", "2026-01-01T00:10:00Z")
