"""A typed, frozen view of a TrainingJob object.

Everything the operator reads from a TrainingJob goes through :func:`parse_training_job`, so
schema defaults live in exactly one place: the CRD (``kubetuner_operator.crd.defaults``) when it
is available, otherwise the fallbacks below, which mirror the documented defaults.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubetuner_trainer.contract import DEFAULT_METRICS_PORT

from .images import default_trainer_image
from .owned_options import OWNED_OPTIONS

GROUP = "kubetuner.dev"
VERSION = "v1alpha1"
PLURAL = "trainingjobs"
KIND = "TrainingJob"
API_VERSION = f"{GROUP}/{VERSION}"

# Dataset entry keys that belong to the operator, not to multidatabackend.json.
OPERATOR_DATASET_KEYS = frozenset({"credentialsSecret", "pvc"})
INLINE_CREDENTIAL_KEYS = frozenset({"aws_access_key_id", "aws_secret_access_key", "aws_session_token"})


class SpecError(ValueError):
    """A TrainingJob spec the operator cannot act on; ``field`` names the offending path."""

    def __init__(self, field_path: str, message: str) -> None:
        super().__init__(f"spec.{field_path}: {message}")
        self.field = field_path


@dataclass(frozen=True)
class SecretKeyRef:
    name: str
    key: str


@dataclass(frozen=True)
class S3CredentialsSecret:
    """A Secret holding S3 keys; key names default to the AWS variable names."""

    name: str
    access_key_id_key: str = "AWS_ACCESS_KEY_ID"
    secret_access_key_key: str = "AWS_SECRET_ACCESS_KEY"


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hub" | "s3" | "pvc"
    hub_id: str = ""
    revision: str | None = None
    variant: str | None = None
    s3_uri: str = ""
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_credentials: S3CredentialsSecret | None = None
    pvc_claim: str = ""
    pvc_path: str = ""


@dataclass(frozen=True)
class ModelSpec:
    family: str
    type: str
    source: ModelSource
    flavour: str | None = None


@dataclass(frozen=True)
class DatasetPvc:
    claim_name: str
    path: str = ""


@dataclass(frozen=True)
class DatasetSpec:
    id: str
    type: str
    entry: Mapping[str, Any]  # the multidatabackend.json keys, operator-only keys removed
    pvc: DatasetPvc | None = None
    credentials: S3CredentialsSecret | None = None

    @property
    def env_prefix(self) -> str:
        """``KUBETUNER_DATASET_<ID>_`` as documented in docs/trainingjob.md."""
        return "KUBETUNER_DATASET_" + re.sub(r"[^A-Za-z0-9]", "_", self.id).upper() + "_"


@dataclass(frozen=True)
class Resources:
    gpus: int = 1
    gpu_resource_name: str = "nvidia.com/gpu"
    cpu: str | None = None
    memory: str | None = None
    shared_memory: str = "8Gi"


@dataclass(frozen=True)
class VolumeSpec:
    """A cache or output volume: an existing claim, a claim to create, or (``None``) an emptyDir."""

    existing_claim: str | None = None
    size: str | None = None
    storage_class_name: str | None = None
    access_modes: tuple[str, ...] = ("ReadWriteOnce",)

    @property
    def creates_claim(self) -> bool:
        return self.existing_claim is None and self.size is not None


@dataclass(frozen=True)
class OutputS3:
    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    credentials: S3CredentialsSecret | None = None


@dataclass(frozen=True)
class HookSpec:
    name: str
    image: str
    command: tuple[str, ...]
    env: tuple[Mapping[str, Any], ...] = ()
    resources: Mapping[str, Any] = field(default_factory=dict)
    backoff_limit: int = 1
    image_pull_policy: str | None = None
    active_deadline_seconds: int | None = None


@dataclass(frozen=True)
class RunPolicy:
    backoff_limit: int = 3
    active_deadline_seconds: int | None = None
    ttl_seconds_after_finished: int | None = None
    suspend: bool = False


@dataclass(frozen=True)
class PodTemplate:
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    affinity: Mapping[str, Any] = field(default_factory=dict)
    priority_class_name: str = ""
    service_account_name: str = ""
    image_pull_secrets: tuple[Mapping[str, Any], ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingJobSpec:
    """What the operator needs from one TrainingJob (identity + spec)."""

    name: str
    namespace: str
    uid: str
    generation: int
    image: str
    image_pull_policy: str
    model: ModelSpec
    config: Mapping[str, Any]
    datasets: tuple[DatasetSpec, ...]
    resources: Resources
    nodes: int
    model_cache: VolumeSpec | None
    data_cache: VolumeSpec | None
    output_pvc: VolumeSpec | None
    output_s3: OutputS3 | None
    hooks_max_concurrent: int
    hooks: tuple[HookSpec, ...]
    hf_token: SecretKeyRef | None
    secret_env: tuple[Mapping[str, Any], ...]
    run_policy: RunPolicy
    queue_name: str | None
    metrics_port: int
    pod_template: PodTemplate


def _defaults(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """Schema defaults as the API server would apply them (H6's module when present)."""
    try:
        from .crd.defaults import apply_defaults  # type: ignore[import-not-found]
    except ImportError:
        return obj
    return apply_defaults(obj)


def _s3_secret(raw: Any, path: str) -> S3CredentialsSecret | None:
    if not raw:
        return None
    if not isinstance(raw, Mapping) or not raw.get("name"):
        raise SpecError(path, "must be an object with a Secret 'name'")
    return S3CredentialsSecret(
        name=str(raw["name"]),
        access_key_id_key=str(raw.get("accessKeyIdKey", "AWS_ACCESS_KEY_ID")),
        secret_access_key_key=str(raw.get("secretAccessKeyKey", "AWS_SECRET_ACCESS_KEY")),
    )


def _volume(raw: Any, path: str, *, default_size: str | None = None) -> VolumeSpec | None:
    if not raw:
        return VolumeSpec(size=default_size) if default_size else None
    if not isinstance(raw, Mapping):
        raise SpecError(path, "must be an object with existingClaim or size")
    if raw.get("existingClaim"):
        return VolumeSpec(existing_claim=str(raw["existingClaim"]))
    size = raw.get("size") or default_size
    if not size:
        raise SpecError(path, "needs either existingClaim or size")
    return VolumeSpec(
        size=str(size),
        storage_class_name=raw.get("storageClassName") or None,
        access_modes=tuple(raw.get("accessModes") or ("ReadWriteOnce",)),
    )


def _model(raw: Mapping[str, Any]) -> ModelSpec:
    family = raw.get("family")
    if not family:
        raise SpecError("model.family", "is required")
    source = raw.get("source") or {}
    kinds = [k for k in ("hub", "s3", "pvc") if source.get(k)]
    if len(kinds) != 1:
        raise SpecError("model.source", f"set exactly one of hub, s3, pvc (got {kinds or 'none'})")
    kind = kinds[0]
    body = source[kind]
    if kind == "hub":
        if not body.get("id"):
            raise SpecError("model.source.hub.id", "is required")
        src = ModelSource(kind, hub_id=str(body["id"]), revision=body.get("revision") or None,
                          variant=body.get("variant") or None)
    elif kind == "s3":
        uri = str(body.get("uri", ""))
        if not uri.startswith("s3://") or len(uri) <= 5:
            raise SpecError("model.source.s3.uri", f"must look like s3://bucket/prefix (got {uri!r})")
        src = ModelSource(kind, s3_uri=uri, s3_endpoint_url=body.get("endpointUrl") or None,
                          s3_region=body.get("region") or None,
                          s3_credentials=_s3_secret(body.get("credentialsSecret"), "model.source.s3.credentialsSecret"))
    else:
        if not body.get("claimName"):
            raise SpecError("model.source.pvc.claimName", "is required")
        src = ModelSource(kind, pvc_claim=str(body["claimName"]), pvc_path=str(body.get("path", "")).strip("/"))
    return ModelSpec(family=str(family), type=str(raw.get("type", "lora")), source=src,
                     flavour=raw.get("flavour") or None)


def _datasets(raw: Any) -> tuple[DatasetSpec, ...]:
    if not raw:
        raise SpecError("datasets", "at least one dataset is required")
    out: list[DatasetSpec] = []
    seen: set[str] = set()
    for i, entry in enumerate(raw):
        path = f"datasets[{i}]"
        if not isinstance(entry, Mapping) or not entry.get("id"):
            raise SpecError(f"{path}.id", "is required")
        ds_id = str(entry["id"])
        if ds_id in seen:
            raise SpecError(f"{path}.id", f"duplicate dataset id {ds_id!r}")
        seen.add(ds_id)
        inline = sorted(INLINE_CREDENTIAL_KEYS & set(entry))
        if inline:
            raise SpecError(f"{path}.{inline[0]}", "inline credentials are not allowed; use credentialsSecret")
        pvc_raw = entry.get("pvc")
        pvc = None
        if pvc_raw:
            if not pvc_raw.get("claimName"):
                raise SpecError(f"{path}.pvc.claimName", "is required")
            pvc = DatasetPvc(str(pvc_raw["claimName"]), str(pvc_raw.get("path", "")).strip("/"))
        clean = {k: v for k, v in entry.items() if k not in OPERATOR_DATASET_KEYS}
        out.append(DatasetSpec(id=ds_id, type=str(entry.get("type", "local")), entry=clean, pvc=pvc,
                               credentials=_s3_secret(entry.get("credentialsSecret"), f"{path}.credentialsSecret")))
    return tuple(out)


def _hooks(raw: Mapping[str, Any]) -> tuple[HookSpec, ...]:
    hooks = []
    names: set[str] = set()
    for i, h in enumerate(raw.get("postCheckpoint") or ()):
        path = f"hooks.postCheckpoint[{i}]"
        for key in ("name", "image", "command"):
            if not h.get(key):
                raise SpecError(f"{path}.{key}", "is required")
        if h["name"] in names:
            raise SpecError(f"{path}.name", f"duplicate hook name {h['name']!r}")
        names.add(h["name"])
        command = h["command"]
        if isinstance(command, str):
            raise SpecError(f"{path}.command", "must be a list of arguments (argv), not a shell string")
        hooks.append(HookSpec(name=str(h["name"]), image=str(h["image"]), command=tuple(str(c) for c in command),
                              env=tuple(h.get("env") or ()), resources=dict(h.get("resources") or {}),
                              backoff_limit=int(h.get("backoffLimit", 1)),
                              image_pull_policy=h.get("imagePullPolicy") or None,
                              active_deadline_seconds=h.get("activeDeadlineSeconds")))
    return tuple(hooks)


def parse_training_job(obj: Mapping[str, Any]) -> TrainingJobSpec:
    """Build the typed view of a TrainingJob object (raises :class:`SpecError` on unusable specs)."""
    obj = _defaults(obj)
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    config = dict(spec.get("config") or {})
    owned = sorted(OWNED_OPTIONS & set(config))
    if owned:
        raise SpecError(f"config.{owned[0]}", "is set by the operator from the spec; remove it from spec.config")
    res = spec.get("resources") or {}
    gpus = int(res.get("gpus", 1))
    if gpus < 0:
        raise SpecError("resources.gpus", f"must be >= 0 (got {gpus})")
    nodes = int(spec.get("nodes", 1))
    if nodes < 1:
        raise SpecError("nodes", f"must be >= 1 (got {nodes})")
    caches = spec.get("caches") or {}
    output = spec.get("output") or {}
    out_s3 = output.get("s3")
    hooks = spec.get("hooks") or {}
    secrets = spec.get("secrets") or {}
    hf = secrets.get("huggingFaceToken")
    for i, env in enumerate(secrets.get("env") or ()):
        if "value" in env or not (env.get("secretKeyRef") or {}).get("name"):
            raise SpecError(f"secrets.env[{i}]", "must reference a Secret with secretKeyRef (inline values are not allowed)")
    policy = spec.get("runPolicy") or {}
    tpl = spec.get("podTemplate") or {}
    return TrainingJobSpec(
        name=str(meta.get("name", "")),
        namespace=str(meta.get("namespace", "default")),
        uid=str(meta.get("uid", "")),
        generation=int(meta.get("generation", 1) or 1),
        image=str(spec.get("image") or default_trainer_image()),
        image_pull_policy=str(spec.get("imagePullPolicy") or "IfNotPresent"),
        model=_model(spec.get("model") or {}),
        config=config,
        datasets=_datasets(spec.get("datasets")),
        resources=Resources(gpus=gpus, gpu_resource_name=str(res.get("gpuResourceName", "nvidia.com/gpu")),
                            cpu=str(res["cpu"]) if res.get("cpu") else None,
                            memory=str(res["memory"]) if res.get("memory") else None,
                            shared_memory=str(res.get("sharedMemory", "8Gi"))),
        nodes=nodes,
        model_cache=_volume(caches.get("models"), "caches.models"),
        data_cache=_volume(caches.get("latents"), "caches.latents"),
        output_pvc=_volume(output.get("pvc"), "output.pvc"),
        output_s3=OutputS3(bucket=str(out_s3["bucket"]), prefix=str(out_s3.get("prefix", "")),
                           endpoint_url=out_s3.get("endpointUrl") or None, region=out_s3.get("region") or None,
                           credentials=_s3_secret(out_s3.get("credentialsSecret"), "output.s3.credentialsSecret"))
        if out_s3 else None,
        hooks_max_concurrent=max(1, int(hooks.get("maxConcurrent", 2))),
        hooks=_hooks(hooks),
        hf_token=SecretKeyRef(str(hf["name"]), str(hf.get("key", "token"))) if hf else None,
        secret_env=tuple(secrets.get("env") or ()),
        run_policy=RunPolicy(backoff_limit=int(policy.get("backoffLimit", 3)),
                             active_deadline_seconds=policy.get("activeDeadlineSeconds"),
                             ttl_seconds_after_finished=policy.get("ttlSecondsAfterFinished"),
                             suspend=bool(policy.get("suspend", False))),
        queue_name=spec.get("queueName") or None,
        metrics_port=int(spec.get("metricsPort", DEFAULT_METRICS_PORT)),
        pod_template=PodTemplate(
            node_selector=dict(tpl.get("nodeSelector") or {}), tolerations=tuple(tpl.get("tolerations") or ()),
            affinity=dict(tpl.get("affinity") or {}), priority_class_name=str(tpl.get("priorityClassName") or ""),
            service_account_name=str(tpl.get("serviceAccountName") or ""),
            image_pull_secrets=tuple(tpl.get("imagePullSecrets") or ()),
            annotations=dict(tpl.get("annotations") or {}), labels=dict(tpl.get("labels") or {})),
    )
