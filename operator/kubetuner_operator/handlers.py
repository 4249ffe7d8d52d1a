"""kopf wiring: watch TrainingJobs and their children, reconcile through the pure functions.

Level-triggered: every watch event of a TrainingJob, of one of its trainer pods or Jobs, and a
periodic poll (trainer progress, deadlines, TTLs) all lead to the same :meth:`Reconciler.reconcile`,
which reads the TrainingJob and its children from kopf's indexes (:mod:`.cache`; no API reads),
asks :func:`reconcile.plan` what to do, and applies that idempotently. Reconciles of one job are serialised by a per-job lock. The operator patches
only ``status`` (and its own counter annotations), never ``spec``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf

from .admission import TenancyPolicy, policy_problems
from .builders.common import LABEL_COMPONENT, LABEL_JOB
from .builders.jobset import JOBSET_GROUP, JOBSET_PLURAL, JOBSET_VERSION
from .builders.network_policy import NetworkPolicySettings
from .cache import ClusterCache, register_indexes
from .kube_api import ApiError, KubeApi
from .metrics import OperatorMetrics, start_metrics_server
from .reconcile import Counters, Observed, Plan, plan, status_endpoint
from .spec import GROUP, KIND, PLURAL, VERSION, SpecError, parse_training_job
from .status import ACTIVE, Outcome, Phase, derive_status, rfc3339, status_changed
from .trainer_client import TrainerClient
from .webhook import WebhookSettings, build_server, fill_ca_bundle
from .webhook import register as register_webhook

log = logging.getLogger("kubetuner.operator")


@dataclass
class OperatorSettings:
    """Knobs of one operator instance (the CLI maps its flags onto these)."""

    login: Callable[..., Any] | None = None  # returns a kopf.ConnectionInfo; None: kopf's default login
    poll_interval: float = 15.0  # seconds between polls of the jobs that need polling
    poll_concurrency: int = 32
    metrics_host: str = "0.0.0.0"
    metrics_port: int | None = 8081  # None: no metrics server
    trainer_timeout: float = 2.0  # seconds per trainer /status request (a fetch makes up to 3)
    api_backoff: float = 0.2  # seconds before the first retry of a transient API error (then doubling)
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    tenancy: TenancyPolicy = field(default_factory=TenancyPolicy)  # allowed images / ServiceAccounts
    webhook: WebhookSettings | None = None  # None: no admission webhook (the reconciler still checks)
    webhook_fail_closed: bool = True  # failurePolicy Fail (else Ignore)
    network_policy: NetworkPolicySettings | None = None  # None: no per-job NetworkPolicy
    jobset: bool | None = None  # multi-node jobs as JobSets; None: when the API server serves jobset.x-k8s.io


class Reconciler:
    def __init__(self, settings: OperatorSettings) -> None:
        self.settings = settings
        self.metrics = OperatorMetrics()
        self.trainer = TrainerClient(timeout=settings.trainer_timeout)
        self.api: KubeApi | None = None
        self.connection: Any = None
        # Jobs polled periodically: training ones (progress), ones with a deadline or TTL ahead,
        # and ones whose last reconcile failed. Everything else is driven by watch events.
        self.polled: set[tuple[str, str]] = set()
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self.metrics_port: int | None = None
        self._seen: dict[tuple[str, str], tuple[Any, ...]] = {}
        self.events = EventRecorder()
        self._checked: dict[tuple[str, str], tuple[Any, list[str]]] = {}
        self.cache = ClusterCache()
        self.jobset: bool | None = settings.jobset
        self._discovery = asyncio.Lock()

    @staticmethod
    def _fingerprint(body: Any) -> tuple[Any, ...]:
        meta = body.get("metadata", {})
        return (meta.get("uid"), meta.get("generation"), meta.get("deletionTimestamp"),
                tuple(sorted((meta.get("annotations") or {}).items())), repr(body.get("spec")))

    def changed_since_reconcile(self, body: Any) -> bool:
        """False when only the status moved since the last event of this object (our own status echo).

        Remembers the event's fingerprint: each change other than status leads to one reconcile.
        """
        key = (body["metadata"].get("namespace", ""), body["metadata"]["name"])
        fingerprint = self._fingerprint(body)
        changed = self._seen.get(key) != fingerprint
        self._seen[key] = fingerprint
        return changed

    async def use_connection(self, info: Any) -> None:
        """Switch the reconciler's API client to new credentials (first login and re-logins)."""
        old, self.api, self.connection = self.api, None, info
        if old is not None:
            await old.close()

    def _api(self) -> KubeApi:
        if self.api is None:
            if self.connection is None:
                raise kopf.TemporaryError("not logged in to the cluster yet", delay=1)
            self.api = KubeApi.from_connection_info(self.connection, backoff=self.settings.api_backoff)
        return self.api

    async def close(self) -> None:
        if self.api is not None:
            await self.api.close()
        await self.trainer.close()

    # ------------------------------------------------------------ observe

    async def _observe(self, api: KubeApi, ns: str, name: str) -> Observed:
        if self.cache.ready:
            return self.cache.observed((ns, name))
        selector = {LABEL_JOB: name}
        pods, jobs, pvcs, svcs, nps, jobsets = await asyncio.gather(
            api.list("Pod", ns, selector), api.list("Job", ns, selector),
            api.list("PersistentVolumeClaim", ns, selector), api.list("Service", ns, selector),
            api.list("NetworkPolicy", ns, selector) if self.settings.network_policy else _nothing(),
            api.list("JobSet", ns, selector) if self.jobset else _nothing())

        def component(obj: dict[str, Any]) -> str:
            return (obj.get("metadata", {}).get("labels") or {}).get(LABEL_COMPONENT, "")

        existing = frozenset((kind, obj["metadata"]["name"])
                             for kind, group in (("PersistentVolumeClaim", pvcs),
                                                 ("Service", svcs), ("NetworkPolicy", nps)) for obj in group)
        return Observed(pods=[p for p in pods if component(p) == "trainer"],
                        trainer_jobs=[{"kind": "Job", **j} for j in jobs if component(j) == "trainer"] +
                        [{"kind": "JobSet", **j} for j in jobsets if component(j) == "trainer"],
                        hook_jobs=[j for j in jobs if component(j) == "hook"],
                        existing=existing)

    # ------------------------------------------------------------ reconcile

    async def reconcile(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            started = time.perf_counter()
            try:
                await self._reconcile(namespace, name)
            except Exception:
                self.metrics.reconcile_errors.inc()
                self.polled.add(key)  # retried by the next poll
                raise
            finally:
                self.metrics.reconcile_seconds.observe(time.perf_counter() - started)

    async def _reconcile(self, namespace: str, name: str) -> None:
        api = self._api()
        body = self.cache.trainingjob((namespace, name)) if self.cache.ready else await api.get(KIND, namespace, name)
        if body is None or body.get("metadata", {}).get("deletionTimestamp"):
            self.forget(namespace, name)
            return
        now = self.settings.clock()
        previous = body.get("status") or {}
        try:
            job = parse_training_job(body)
        except SpecError as exc:
            await self._invalid_spec(api, body, previous, str(exc), now)
            return
        invalid = await self._config_problems(body)
        if invalid:
            await self._invalid_spec(api, body, previous, "; ".join(invalid), now, reason="InvalidConfig")
            return
        counters = Counters.from_annotations(body["metadata"].get("annotations"))
        jobset = job.nodes > 1 and await self._jobset_served(api)
        observed = await self._observe(api, namespace, name)
        endpoint = status_endpoint(job, counters, observed)
        trainer = await self.trainer.fetch(*endpoint) if endpoint else None
        result = plan(job, counters=counters, observed=observed, trainer=trainer, previous_status=previous, now=now,
                      network=self.settings.network_policy, jobset=jobset)
        await self._apply(api, body, result, previous)

    async def _jobset_served(self, api: KubeApi) -> bool:
        """Whether JobSets are served, asked once per process (API discovery; installing the JobSet
        CRD later takes an operator restart, like kopf's own view of the resources it watches)."""
        async with self._discovery:
            if self.jobset is None:
                self.jobset = await api.serves("JobSet")
                log.info("JobSet API (%s/%s) %s: multi-node jobs run as %s", JOBSET_GROUP, JOBSET_VERSION,
                         "found" if self.jobset else "not found",
                         "JobSets" if self.jobset else "Indexed Jobs with a headless Service")
            return self.jobset

    async def _apply(self, api: KubeApi, body: dict[str, Any], result: Plan, previous: dict[str, Any]) -> None:
        meta = body["metadata"]
        ns, name = meta["namespace"], meta["name"]
        if result.counters is not None:
            # Persist the attempt before creating the child it names: a restart mid-way re-plans the same.
            await api.patch(KIND, ns, name, {"metadata": {"annotations": result.counters.to_annotations()}})
            self.cache.wrote((ns, name), meta.get("uid", ""), counters=result.counters)
            if result.counters.restarts > Counters.from_annotations(meta.get("annotations")).restarts:
                self.metrics.restarts.inc()
        for kind, child in result.delete:
            if await api.delete(kind, ns, child):
                await self.events.post(api, body, "Normal", "Deleted", f"Deleted {kind} {child}.",
                                       self.settings.clock())
        created, refusal = await self._create(api, (ns, name), result.create)
        status = result.status
        events = [(e.type, e.reason, e.message) for e in result.events]
        if refusal is not None and result.restatus is not None and result.outcome is not None:
            status, events = _refused_status(result, refusal, previous)
        if created:  # said in the reconcile's first event, not one per child: events are API writes too
            note = f"Created {', '.join(created)}."
            events = ([(events[0][0], events[0][1], f"{events[0][2]} {note}"), *events[1:]] if events
                      else [("Normal", "Created", note)])
        if status_changed(previous, status):
            await api.patch(KIND, ns, name, {"status": status}, subresource="status")
            self.cache.wrote((ns, name), meta.get("uid", ""), status=status)
        self.metrics.hooks_finished(previous.get("hooks") or (), status["hooks"])
        self.metrics.set_phase((ns, name), status["phase"])
        if status["phase"] in ACTIVE or result.requeue_after is not None or refusal is not None:
            self.polled.add((ns, name))  # a refusal may be lifted (quota freed): try again later
        else:
            self.polled.discard((ns, name))
        now = self.settings.clock()
        for etype, reason, message in events:
            await self.events.post(api, body, etype, reason, message, now)
        if result.delete_trainingjob:
            await api.delete(KIND, ns, name)
            self.forget(ns, name)

    async def _create(self, api: KubeApi, key: tuple[str, str], objs: list[dict[str, Any]]
                      ) -> tuple[list[str], Refusal | None]:
        """Create-or-get each object; (what was created, the first refusal by the API server)."""
        created: list[str] = []
        for obj in objs:
            what = f"{obj['kind']} {obj['metadata']['name']}"
            try:
                if await api.create(obj):
                    created.append(what)
                self.cache.created(key, obj["kind"], obj["metadata"]["name"])
            except ApiError as exc:
                if exc.transient:
                    raise
                # A refused trainer or PVC cannot train: permanent for this spec. A refused
                # hook Job stalls its hooks only; other refusals (quota, RBAC) may be lifted later.
                permanent = exc.status in PERMANENT_STATUSES and not _is_hook(obj)
                return created, Refusal(permanent, f"The API server refused {what}: {exc}")
        return created, None

    async def _config_problems(self, body: dict[str, Any]) -> list[str]:
        """The admission webhook's checks (admission.policy_problems), once per spec generation.

        Where the webhook is not installed (or failed open) this keeps an invalid spec from ever
        creating a child: the TrainingJob fails with reason InvalidConfig instead.
        """
        meta = body["metadata"]
        key, generation = (meta["namespace"], meta["name"]), (meta.get("uid"), meta.get("generation"))
        cached = self._checked.get(key)
        if cached is None or cached[0] != generation:
            problems = await asyncio.to_thread(policy_problems, body, self.settings.tenancy)
            self._checked[key] = cached = (generation, problems)
        return cached[1]

    async def _invalid_spec(self, api: KubeApi, body: dict[str, Any], previous: dict[str, Any], message: str,
                            now: datetime, *, reason: str = "InvalidSpec") -> None:
        """A spec the operator cannot act on is a permanent failure until the spec changes."""
        meta = body["metadata"]
        outcome = Outcome(Phase.FAILED, reason, message)
        generation = int(meta.get("generation", 1) or 1)
        status = derive_status(outcome=outcome, generation=generation, trainer=None, previous=previous, now=now,
                               restarts=int(previous.get("restarts", 0)), hooks=previous.get("hooks") or ())
        if status_changed(previous, status):
            await api.patch(KIND, meta["namespace"], meta["name"], {"status": status}, subresource="status")
            self.cache.wrote((meta["namespace"], meta["name"]), meta.get("uid", ""), status=status)
            await self.events.post(api, body, "Warning", reason, message, now)
        self.metrics.set_phase((meta["namespace"], meta["name"]), str(Phase.FAILED))

    def forget(self, namespace: str, name: str) -> None:
        self.polled.discard((namespace, name))
        self._checked.pop((namespace, name), None)
        self._locks.pop((namespace, name), None)
        self._seen.pop((namespace, name), None)
        self.events.forget(namespace, name)
        self.cache.forget((namespace, name))
        self.metrics.set_phase((namespace, name), None)

    async def poll_forever(self) -> None:
        """Reconcile the polled jobs periodically (trainer progress, deadlines, TTLs, retries).

        Every job is polled on its own: a round starts the jobs whose previous poll has finished
        and never waits for the others, so a slow trainer delays only its own job's progress.
        """
        semaphore = asyncio.Semaphore(self.settings.poll_concurrency)
        in_flight: dict[tuple[str, str], asyncio.Task[None]] = {}

        async def one(key: tuple[str, str]) -> None:
            async with semaphore:
                try:
                    await self.reconcile(*key)
                except Exception as exc:  # the next round retries; one job must not stop the loop
                    log.warning("periodic reconcile of %s/%s failed: %s", key[0], key[1], exc)

        try:
            while True:
                await asyncio.sleep(self.settings.poll_interval)
                for key in sorted(self.polled - in_flight.keys()):
                    task = asyncio.create_task(one(key))
                    in_flight[key] = task
                    task.add_done_callback(lambda _, key=key: in_flight.pop(key, None))
        finally:
            for task in list(in_flight.values()):
                task.cancel()


def build_registry(reconciler: Reconciler) -> kopf.OperatorRegistry:
    """A kopf registry whose handlers all funnel into ``reconciler``."""
    registry = kopf.OperatorRegistry()
    settings = reconciler.settings
    tasks: list[asyncio.Task[None]] = []
    register_indexes(registry, network_policies=settings.network_policy is not None)

    webhook = settings.webhook
    if webhook is not None:
        register_webhook(registry, settings.tenancy, fail_closed=settings.webhook_fail_closed)
        server, ca = build_server(webhook)

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.scanning.disabled = True
        if webhook is not None:
            settings.admission.server = server
            if webhook.configuration:
                tasks.append(asyncio.create_task(_publish_ca(reconciler, webhook.configuration, ca)))
        settings.posting.level = logging.WARNING  # our own events cover transitions
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
        settings.watching.reconnect_backoff = 0.5
        if reconciler.settings.metrics_port is not None:
            runner, port = await start_metrics_server(reconciler.metrics, reconciler.settings.metrics_host,
                                                      reconciler.settings.metrics_port)
            reconciler.metrics_port = port
            tasks.append(asyncio.create_task(_hold(runner)))
        tasks.append(asyncio.create_task(reconciler.poll_forever()))

    @kopf.on.cleanup(registry=registry)
    async def shutdown(**_: Any) -> None:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await reconciler.close()

    @kopf.on.login(registry=registry)
    async def login(**kwargs: Any) -> Any:
        # kopf logs in again when credentials stop working (e.g. a rotated token): follow it.
        if settings.login is not None:
            info = settings.login(**kwargs)
        else:
            info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
        await reconciler.use_connection(info)
        return info

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def trainingjob_event(type: str, name: str, namespace: str, body: Any, **kwargs: Any) -> None:
        reconciler.cache.capture(kwargs)
        if type == "DELETED":
            reconciler.forget(namespace, name)
            return
        if not reconciler.changed_since_reconcile(body) and type == "MODIFIED":
            return  # our own status write echoed back: nothing new to act on
        await _reconcile_or_retry(reconciler, namespace, name)

    @kopf.on.event("v1", "pods", labels={LABEL_JOB: kopf.PRESENT, LABEL_COMPONENT: "trainer"}, registry=registry)
    async def pod_event(labels: dict[str, str], namespace: str, **kwargs: Any) -> None:
        reconciler.cache.capture(kwargs)
        await _reconcile_or_retry(reconciler, namespace, labels[LABEL_JOB])

    @kopf.on.event("batch", "v1", "jobs", labels={LABEL_JOB: kopf.PRESENT}, registry=registry)
    async def job_event(labels: dict[str, str], namespace: str, **kwargs: Any) -> None:
        reconciler.cache.capture(kwargs)
        await _reconcile_or_retry(reconciler, namespace, labels[LABEL_JOB])

    @kopf.on.event(JOBSET_GROUP, JOBSET_VERSION, JOBSET_PLURAL, labels={LABEL_JOB: kopf.PRESENT}, registry=registry)
    async def jobset_event(labels: dict[str, str], namespace: str, **kwargs: Any) -> None:
        reconciler.cache.capture(kwargs)
        await _reconcile_or_retry(reconciler, namespace, labels[LABEL_JOB])

    return registry


@dataclass(frozen=True)
class Refusal:
    """The API server refused to create a child (4xx other than 409/429)."""

    permanent: bool
    message: str


PERMANENT_STATUSES = frozenset({400, 422})  # the object itself is invalid: retrying the same spec cannot help


def _is_hook(obj: dict[str, Any]) -> bool:
    return (obj["metadata"].get("labels") or {}).get(LABEL_COMPONENT) == "hook"


def _refused_status(result: Plan, refusal: Refusal, previous: dict[str, Any]
                    ) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
    """The status and events when a child was refused: Failed if permanent, else ``Stalled``."""
    assert result.restatus is not None and result.outcome is not None
    message = refusal.message[:1024]
    reason = "CreateRejected" if refusal.permanent else "CreateRefused"
    outcome = Outcome(Phase.FAILED, reason, message) if refusal.permanent else result.outcome
    status = result.restatus(outcome=outcome, stalled=(reason, message))
    before = next((c for c in previous.get("conditions") or () if c.get("type") == "Stalled"), {})
    if before.get("status") == "True" and before.get("message") == message:
        return status, []  # reported already: no event per poll
    return status, [("Warning", reason, message)]


class EventRecorder:
    """Posts core/v1 Events, dropping a repeat of the same event for the same job within ``window`` seconds
    (client-go's event correlator does the same for Go controllers)."""

    def __init__(self, window: float = 600.0) -> None:
        self.window = window
        self._posted: dict[tuple[str, str], dict[tuple[str, str, str], datetime]] = {}

    async def post(self, api: KubeApi, body: dict[str, Any], etype: str, reason: str, message: str,
                   now: datetime) -> None:
        meta = body["metadata"]
        posted = self._posted.setdefault((meta["namespace"], meta["name"]), {})
        for key in [k for k, at in posted.items() if (now - at).total_seconds() >= self.window]:
            del posted[key]
        if (etype, reason, message) in posted:
            return
        posted[(etype, reason, message)] = now
        await post_event(api, body, etype, reason, message, now)

    def forget(self, namespace: str, name: str) -> None:
        self._posted.pop((namespace, name), None)


async def post_event(api: KubeApi, body: dict[str, Any], etype: str, reason: str, message: str,
                     now: datetime) -> None:
    """A core/v1 Event on the TrainingJob. Best effort: a lost event must not fail the reconcile."""
    meta = body["metadata"]
    stamp = rfc3339(now)
    event = {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {"apiVersion": body.get("apiVersion", f"{GROUP}/{VERSION}"), "kind": KIND,
                           "name": meta["name"], "namespace": meta["namespace"], "uid": meta.get("uid", "")},
        "type": etype, "reason": reason, "message": message[:1024],
        "source": {"component": "kubetuner-operator"}, "reportingComponent": "kubetuner-operator",
        "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
    }
    try:
        await api.create(event)
    except ApiError as exc:
        log.warning("could not post event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], exc)


async def _nothing() -> list[dict[str, Any]]:
    return []


async def _publish_ca(reconciler: Reconciler, configuration: str, ca: bytes) -> None:
    """Fill the webhook configuration's caBundle with the self-signed CA, retrying until it works."""
    delay = 1.0
    while True:
        try:
            await fill_ca_bundle(reconciler._api(), configuration, ca)
            return
        except (ApiError, kopf.TemporaryError) as exc:
            log.warning("cannot write the webhook CA into %s yet: %s", configuration, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)


async def _hold(runner: Any) -> None:
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


async def _reconcile_or_retry(reconciler: Reconciler, namespace: str, name: str) -> None:
    try:
        await reconciler.reconcile(namespace, name)
    except ApiError as exc:
        # Event handlers are not retried by kopf; the periodic poll picks the job up again.
        reconciler.polled.add((namespace, name))
        log.warning("reconcile of %s/%s failed (%s); will retry on the next poll", namespace, name, exc)


async def run_operator(settings: OperatorSettings, *, namespaces: list[str] | None = None,
                       liveness_endpoint: str | None = None, stop_flag: Any = None, ready_flag: Any = None,
                       reconciler: Reconciler | None = None, standalone: bool = True) -> None:
    """Run the operator until ``stop_flag`` is set (or forever, stopping on SIGINT/SIGTERM)."""
    reconciler = reconciler or Reconciler(settings)
    registry = build_registry(reconciler)
    await kopf.operator(registry=registry, standalone=standalone, clusterwide=not namespaces,
                        namespaces=namespaces or (), liveness_endpoint=liveness_endpoint,
                        stop_flag=stop_flag, ready_flag=ready_flag)
