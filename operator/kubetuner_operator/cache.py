"""The operator's in-memory view of the cluster: kopf indexes of TrainingJobs and their children.

kopf fills every index from its watch streams before it calls any handler (and keeps them
current), so a reconcile reads memory instead of listing five kinds from the API server. Each
index keeps only the fields the reconciler reads (a "view"), which bounds the operator's memory
at thousands of jobs: a trainer pod's spec is most of its size and is never needed.

Our own writes reach the indexes only when their watch event arrives, so :class:`Written`
remembers the last counters and status this process wrote per job: the reconciler combines them
with the indexed TrainingJob, so a reconcile that runs before the echo never re-decides from an
older state.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from .builders.common import LABEL_COMPONENT, LABEL_JOB
from .builders.jobset import JOBSET_GROUP, JOBSET_PLURAL, JOBSET_VERSION
from .builders.multinode import COMPLETION_INDEX_ANNOTATION
from .reconcile import Counters, Observed
from .spec import GROUP, PLURAL, VERSION

Key = tuple[str, str]  # (namespace, TrainingJob name)
TRAININGJOBS, PODS, JOBS, JOBSETS = "kubetuner_trainingjobs", "kubetuner_trainer_pods", "kubetuner_jobs", \
    "kubetuner_jobsets"
# Children the reconciler only needs to know exist: kind -> (API group, version, plural).
OWNED = {"PersistentVolumeClaim": ("", "v1", "persistentvolumeclaims"), "Service": ("", "v1", "services")}
# Watched only when the operator creates per-job NetworkPolicies (the chart grants it only then).
NETWORK_POLICY = {"NetworkPolicy": ("networking.k8s.io", "v1", "networkpolicies")}
DROPPED_ANNOTATIONS = ("kubectl.kubernetes.io/last-applied-configuration", f"{GROUP}/last-handled-configuration")


def _meta(body: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    return {k: copy.deepcopy(meta[k]) for k in keys if meta.get(k) is not None}


def trainingjob_view(body: Mapping[str, Any]) -> dict[str, Any]:
    """What a reconcile reads of a TrainingJob (no managedFields, no last-applied copies)."""
    meta = _meta(body, "name", "namespace", "uid", "generation", "labels", "deletionTimestamp",
                 "resourceVersion")
    annotations = {k: v for k, v in ((body.get("metadata") or {}).get("annotations") or {}).items()
                   if k not in DROPPED_ANNOTATIONS}
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "metadata": meta,
            "spec": copy.deepcopy(body.get("spec") or {}), "status": copy.deepcopy(body.get("status") or {})}


def pod_view(body: Mapping[str, Any]) -> dict[str, Any]:
    """A trainer pod as :func:`reconcile.classify_pod` and :func:`reconcile.status_endpoint` read it."""
    meta = _meta(body, "name", "labels", "deletionTimestamp")
    index = ((body.get("metadata") or {}).get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION)
    if index is not None:
        meta["annotations"] = {COMPLETION_INDEX_ANNOTATION: index}
    gates = (body.get("spec") or {}).get("schedulingGates")
    return {"metadata": meta, "spec": {"schedulingGates": copy.deepcopy(gates)} if gates else {},
            "status": copy.deepcopy(body.get("status") or {})}


def job_view(body: Mapping[str, Any]) -> dict[str, Any]:
    """A trainer or hook Job, or a trainer JobSet: its kind, conditions, start time and whether it is suspended."""
    suspend = (body.get("spec") or {}).get("suspend")
    return {"kind": body.get("kind", "Job"), "metadata": _meta(body, "name", "labels", "deletionTimestamp"),
            "spec": {"suspend": suspend} if suspend is not None else {},
            "status": copy.deepcopy(body.get("status") or {})}


def _job_key(namespace: str | None, labels: Mapping[str, str]) -> Key:
    return (namespace or "", labels[LABEL_JOB])


def owned_kinds(*, network_policies: bool) -> dict[str, tuple[str, str, str]]:
    """The owned kinds indexed (and watched) by an operator with or without per-job NetworkPolicies."""
    return {**OWNED, **(NETWORK_POLICY if network_policies else {})}


def register_indexes(registry: kopf.OperatorRegistry, *, network_policies: bool = False) -> None:
    """The indexes :class:`ClusterCache` reads, registered on ``registry``."""
    children = {LABEL_JOB: kopf.PRESENT}

    @kopf.index(GROUP, VERSION, PLURAL, id=TRAININGJOBS, registry=registry)
    def trainingjobs(namespace: str, name: str, body: Any, **_: Any) -> dict[Key, Any]:
        return {(namespace, name): trainingjob_view(body)}

    @kopf.index("v1", "pods", id=PODS, labels={**children, LABEL_COMPONENT: "trainer"}, registry=registry)
    def pods(namespace: str, labels: Mapping[str, str], body: Any, **_: Any) -> dict[Key, Any]:
        return {_job_key(namespace, labels): pod_view(body)}

    @kopf.index("batch", "v1", "jobs", id=JOBS, labels=children, registry=registry)
    def jobs(namespace: str, labels: Mapping[str, str], body: Any, **_: Any) -> dict[Key, Any]:
        return {_job_key(namespace, labels): job_view(body)}

    # kopf watches it only where the API is installed (its discovery at start-up); else it stays empty.
    @kopf.index(JOBSET_GROUP, JOBSET_VERSION, JOBSET_PLURAL, id=JOBSETS, labels=children, registry=registry)
    def jobsets(namespace: str, labels: Mapping[str, str], body: Any, **_: Any) -> dict[Key, Any]:
        return {_job_key(namespace, labels): job_view(body)}

    for kind, (group, version, plural) in owned_kinds(network_policies=network_policies).items():
        def owned(namespace: str, labels: Mapping[str, str], name: str, kind: str = kind, **_: Any
                  ) -> dict[Key, Any]:
            return {_job_key(namespace, labels): (kind, name)}

        api = (group, version) if group else (version,)
        kopf.index(*api, plural, id=_owned_id(kind), labels=children, registry=registry)(owned)


def _owned_id(kind: str) -> str:
    return f"kubetuner_{kind.lower()}s"


@dataclass
class Written:
    """The counters and status this process last wrote for a job (until the watch echoes them)."""

    uid: str
    counters: Counters = field(default_factory=Counters)
    status: dict[str, Any] | None = None


class ClusterCache:
    """Reads of the kopf indexes (captured from any handler's kwargs) plus what we wrote ourselves."""

    def __init__(self) -> None:
        self.indexes: Mapping[str, Any] | None = None
        self.written: dict[Key, Written] = {}
        # PVCs/Services/NetworkPolicies we created (or found) that the index has not shown yet.
        self.pending: dict[Key, set[tuple[str, str]]] = {}

    @property
    def ready(self) -> bool:
        return self.indexes is not None

    def capture(self, kwargs: Mapping[str, Any]) -> None:
        """Keep the index objects kopf passes to handlers (they are live, updated in place)."""
        if self.indexes is None and TRAININGJOBS in kwargs:
            names = (TRAININGJOBS, PODS, JOBS, JOBSETS, *map(_owned_id, {**OWNED, **NETWORK_POLICY}))
            self.indexes = {name: kwargs[name] for name in names if name in kwargs}

    def _values(self, index: str, key: Key) -> list[Any]:
        assert self.indexes is not None
        return list(self.indexes[index].get(key, ())) if index in self.indexes else []

    def trainingjob(self, key: Key) -> dict[str, Any] | None:
        """The indexed TrainingJob with our own newer counters and status laid over it; None: gone."""
        found = self._values(TRAININGJOBS, key)
        if not found:
            return None
        body = dict(found[0])
        mine = self.written.get(key)
        if mine is None or mine.uid != body["metadata"].get("uid"):
            return body
        counters = max(Counters.from_annotations(body["metadata"].get("annotations")), mine.counters,
                       key=lambda c: (c.attempt, c.restarts))
        body["metadata"] = {**body["metadata"], "annotations": {
            **(body["metadata"].get("annotations") or {}), **counters.to_annotations()}}
        if mine.status is not None:
            body["status"] = mine.status  # only the operator writes status
        return body

    def observed(self, key: Key) -> Observed:
        """The children of one TrainingJob, from memory."""
        def component(obj: Mapping[str, Any]) -> str:
            return (obj.get("metadata", {}).get("labels") or {}).get(LABEL_COMPONENT, "")

        jobs = self._values(JOBS, key) + self._values(JOBSETS, key)
        indexed = {ref for kind in {**OWNED, **NETWORK_POLICY} for ref in self._values(_owned_id(kind), key)}
        pending = self.pending.get(key, set())
        pending -= indexed  # seen now: from here on the index says whether it still exists
        existing = frozenset(indexed | pending)
        return Observed(pods=self._values(PODS, key),
                        trainer_jobs=[j for j in jobs if component(j) == "trainer"],
                        hook_jobs=[j for j in jobs if component(j) == "hook"], existing=existing)

    def wrote(self, key: Key, uid: str, *, counters: Counters | None = None,
              status: dict[str, Any] | None = None) -> None:
        mine = self.written.get(key)
        if mine is None or mine.uid != uid:
            mine = self.written[key] = Written(uid)
        if counters is not None:
            mine.counters = counters
        if status is not None:
            mine.status = status

    def created(self, key: Key, kind: str, name: str) -> None:
        """``kind``/``name`` exists (we created it, or a create answered 409) though not indexed yet."""
        if kind in OWNED or kind in NETWORK_POLICY:
            self.pending.setdefault(key, set()).add((kind, name))

    def forget(self, key: Key) -> None:
        self.written.pop(key, None)
        self.pending.pop(key, None)
