"""The TrainingJob CustomResourceDefinition, generated from the option registry.

``trainingjob_openapi_schema()`` is the structural ``openAPIV3Schema`` (spec and status);
``build_crd()`` wraps it in an ``apiextensions.k8s.io/v1`` CustomResourceDefinition.
"""

from __future__ import annotations

from kubetuner_trainer.contract import DEFAULT_METRICS_PORT
from kubetuner_trainer.options import get_registry

from ..status import FINISHED_HOOK_RESULTS, HOOK_STATUS_LIMIT
from .config_schema import config_schema
from .dataset_rules import spec_rules
from .datasets import datasets_schema
from .fields import (
    DNS1123_LABEL,
    DNS1123_SUBDOMAIN,
    ENV_VAR_NAME,
    QUALIFIED_NAME,
    Schema,
    array,
    boolean,
    claim_ref,
    credentials_secret,
    integer,
    obj,
    quantity,
    resource_requirements,
    rule,
    secret_key_ref,
    string,
    string_map,
    volume,
)
from .upstream import upstream

GROUP = "kubetuner.dev"
VERSION = "v1alpha1"
KIND = "TrainingJob"
PLURAL = "trainingjobs"
SINGULAR = "trainingjob"
SHORT_NAMES = ["tj"]
CATEGORIES = ["kubetuner"]
CRD_NAME = f"{PLURAL}.{GROUP}"
HOOK_RESULTS = ["Pending", "Running", *FINISHED_HOOK_RESULTS]
PHASES = ["Pending", "Caching", "Running", "Succeeded", "Failed", "Suspended", "Restarting"]
# Longest TrainingJob name: child names (pods, hook Jobs, Services) append suffixes to it.
MAX_NAME_LENGTH = 52
GENERATED_SUFFIX_LENGTH = 5

HF_REPO_ID = r"^([A-Za-z0-9][-_.A-Za-z0-9]*/)?[A-Za-z0-9][-_.A-Za-z0-9]*$"
S3_URI = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$"
# Label/annotation prefixes the operator manages on its pods (queue membership comes from spec.queueName).
RESERVED_PREFIXES = ("kubetuner.dev/", "kueue.x-k8s.io/")


def _choices(option_name: str) -> list | None:
    registry = get_registry()
    if option_name not in registry:
        return None
    choices = registry.get(option_name).choices
    return list(choices) if choices is not None else None


def model_schema() -> Schema:
    families = _choices("model_family")
    flavours = _choices("model_flavour")
    family = string("Model architecture (the trainer's model_family).", **({"enum": families} if families else {}))
    flavour = string("Variant of the family (the trainer's model_flavour), e.g. base-1.0.", maxLength=128,
                     **({"enum": flavours} if flavours else {"pattern": r"^[A-Za-z0-9][-_.A-Za-z0-9]*$"}))
    types = _choices("model_type") or ["full", "lora"]
    source = obj(
        "Where the pretrained weights come from: exactly one of hub, s3 or pvc.",
        {
            "hub": obj("A Hugging Face Hub repository.", {
                "id": string("Repository id, e.g. stabilityai/stable-diffusion-xl-base-1.0.", minLength=1,
                             maxLength=256, pattern=HF_REPO_ID),
                "revision": string("Branch, tag or commit.", minLength=1, maxLength=256),
                "variant": string("Weight file variant, e.g. fp16.", minLength=1, maxLength=64,
                                  pattern=r"^[A-Za-z0-9_]+$"),
            }, required=["id"]),
            "s3": obj("A diffusers folder (or single .safetensors file) in S3.", {
                "uri": string("s3://bucket/prefix/", maxLength=2048, pattern=S3_URI),
                "endpointUrl": string("Endpoint of an S3-compatible store.", maxLength=2048, pattern=r"^https?://"),
                "region": string("S3 region.", maxLength=64),
                "credentialsSecret": credentials_secret("Secret with the S3 keys."),
            }, required=["uri"]),
            "pvc": claim_ref("A diffusers folder (or single .safetensors file) on an existing claim."),
        },
        rules=[rule("(has(self.hub) ? 1 : 0) + (has(self.s3) ? 1 : 0) + (has(self.pvc) ? 1 : 0) == 1",
                    "set exactly one of hub, s3 or pvc")],
    )
    return obj("The model to fine-tune; fixed once the TrainingJob exists (checkpoints belong to it).", {
        "family": family,
        "flavour": flavour,
        "type": string("Train a LoRA adapter or all weights.", enum=types, default="lora"),
        "source": source,
    }, required=["family", "source"], rules=[
        rule("self == oldSelf", "model cannot change once the TrainingJob exists: its checkpoints belong to "
                                "this model; create a new TrainingJob instead"),
    ])


def resources_schema() -> Schema:
    return obj("Compute per node (pod).", {
        "gpus": integer("GPUs per node; 0 trains on CPU.", minimum=0, maximum=64, default=1),
        "gpuResourceName": string("Extended resource that counts GPUs.", maxLength=253, pattern=QUALIFIED_NAME,
                                  default="nvidia.com/gpu"),
        "cpu": quantity("CPU request and limit, e.g. \"8\"."),
        "memory": quantity("Memory request and limit, e.g. 64Gi."),
        "sharedMemory": quantity("Size of the memory-backed /dev/shm (data loader workers, NCCL).",
                                 default="8Gi"),
    }, default={})


def output_schema() -> Schema:
    return obj(
        "Where checkpoints and the final model go: a claim, S3, or both; fixed once the TrainingJob exists.",
        {
            "pvc": volume("Claim for checkpoints (the trainer's output_dir); resume needs it."),
            "s3": obj("Publish checkpoints and the final model to S3.", {
                "bucket": string("Bucket.", minLength=3, maxLength=63),
                "prefix": string("Key prefix.", maxLength=1024),
                "endpointUrl": string("Endpoint of an S3-compatible store.", maxLength=2048, pattern=r"^https?://"),
                "region": string("S3 region.", maxLength=64),
                "credentialsSecret": credentials_secret("Secret with the S3 keys."),
            }, required=["bucket"]),
        },
        rules=[
            rule("has(self.pvc) || has(self.s3)", "output needs pvc, s3 or both"),
        ],
    )


def env_var_schema() -> Schema:
    ref = {
        "name": string("Object name.", minLength=1, maxLength=253, pattern=DNS1123_SUBDOMAIN),
        "key": string("Key.", minLength=1, maxLength=253),
        "optional": boolean("Start even when the key is missing."),
    }
    return obj(
        "An environment variable: a plain value, or a reference to a Secret or ConfigMap key.",
        {
            "name": string("Variable name.", minLength=1, maxLength=256, pattern=ENV_VAR_NAME),
            "value": string("Plain value (no secrets: use valueFrom.secretKeyRef).", maxLength=32768),
            "valueFrom": obj("Take the value from a Secret or ConfigMap key.", {
                "secretKeyRef": obj("A Secret key.", ref, required=["name", "key"]),
                "configMapKeyRef": obj("A ConfigMap key.", ref, required=["name", "key"]),
            }, rules=[rule("has(self.secretKeyRef) != has(self.configMapKeyRef)",
                           "set exactly one of secretKeyRef or configMapKeyRef")]),
        },
        required=["name"],
        rules=[
            rule("!(has(self.value) && has(self.valueFrom))", "set value or valueFrom, not both"),
        ],
    )


def hooks_schema() -> Schema:
    hook = obj(
        "A Job started once per new checkpoint; placeholders such as {local_checkpoint_path} and "
        "{global_step} in command are substituted per argument.",
        {
            "name": string("Hook name (DNS-1123 label); part of the Job name.", minLength=1, maxLength=30,
                           pattern=DNS1123_LABEL),
            "image": string("Container image.", minLength=1, maxLength=512),
            "imagePullPolicy": string("Pull policy.", enum=["Always", "IfNotPresent", "Never"]),
            "command": array("argv of the hook; no shell is involved.",
                             string("One argument.", maxLength=4096), minItems=1, maxItems=256),
            "env": array("Environment variables.", env_var_schema(), maxItems=64,
                         **{"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]}),
            "resources": resource_requirements("Resources of the hook container."),
            "backoffLimit": integer("Retries of the hook Job.", minimum=0, maximum=20, default=1),
            "activeDeadlineSeconds": integer("Deadline of the hook Job.", minimum=1),
        },
        required=["name", "image", "command"],
    )
    return obj("Jobs run after checkpoints.", {
        "maxConcurrent": integer("Hook Jobs of this TrainingJob running at once.", minimum=1, maximum=64,
                                 default=2),
        "postCheckpoint": array("Hooks run for every new checkpoint; names are unique.", hook, maxItems=16,
                                **{"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]}),
    })


def secrets_schema() -> Schema:
    env_item = obj("A variable whose value comes from a Secret key.", {
        "name": string("Variable name.", minLength=1, maxLength=256, pattern=ENV_VAR_NAME),
        "secretKeyRef": secret_key_ref("The Secret key."),
    }, required=["name", "secretKeyRef"], rules=[
        rule("!self.name.startsWith('KUBETUNER_')", "variables starting with KUBETUNER_ are reserved"),
    ])
    return obj("Credentials, always by reference to Secrets.", {
        "huggingFaceToken": secret_key_ref("Hub token for gated or private models (HF_TOKEN).",
                                           default_key="token"),
        "env": array("Extra environment variables from Secrets.", env_item, maxItems=64,
                     **{"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]}),
    })


def run_policy_schema() -> Schema:
    return obj("Retries, deadlines and suspension.", {
        "backoffLimit": integer("Restarts after crashes or preemptions before the job fails.", minimum=0,
                                maximum=100, default=3),
        "activeDeadlineSeconds": integer("Fail the job after this many seconds.", minimum=1),
        "ttlSecondsAfterFinished": integer("Delete the TrainingJob this long after it finished.", minimum=0),
        "suspend": boolean("Delete the trainer pods but keep caches and outputs; resuming continues from the "
                           "latest checkpoint.", default=False),
    }, default={})


def pod_template_schema() -> Schema:
    toleration = obj("A toleration (corev1.Toleration).", {
        "key": string("Taint key; empty with operator Exists matches all.", maxLength=317),
        "operator": string("How key and value match.", enum=["Exists", "Equal"]),
        "value": string("Taint value.", maxLength=63),
        "effect": string("Taint effect; empty matches all.", enum=["NoSchedule", "PreferNoSchedule", "NoExecute"]),
        "tolerationSeconds": integer("How long a NoExecute taint is tolerated.", minimum=0),
    }, rules=[
        rule("!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
             "value must be empty when operator is Exists"),
        rule("!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
             "tolerationSeconds only applies to effect NoExecute"),
        rule("(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
             "an empty key needs operator Exists"),
    ])
    return obj("Overrides for the trainer pods.", {
        "nodeSelector": string_map("Node labels the pods must match.", label_values=True),
        "tolerations": array("Tolerations added to the pods (GPU taints are tolerated already).", toleration,
                             maxItems=64),
        "affinity": {**upstream("Affinity"),
                     "description": "corev1.Affinity of the pods (node, pod and anti-affinity), checked like the "
                                    "Pod API checks it."},
        "priorityClassName": string("PriorityClass of the pods.", maxLength=253, pattern=DNS1123_SUBDOMAIN),
        "serviceAccountName": string("ServiceAccount of the pods.", maxLength=253, pattern=DNS1123_SUBDOMAIN),
        "imagePullSecrets": array("Secrets for pulling the image.", obj("A Secret reference.", {
            "name": string("Secret name.", minLength=1, maxLength=253, pattern=DNS1123_SUBDOMAIN)},
            required=["name"]), maxItems=16),
        "annotations": string_map("Annotations added to the pods.", reserved_prefixes=RESERVED_PREFIXES),
        "labels": string_map("Labels added to the pods.", label_values=True, reserved_prefixes=RESERVED_PREFIXES),
    })


def _rwx_rule(path: str, label: str) -> dict[str, str]:
    parts = path.split(".")
    present = " && ".join("has(self." + ".".join(parts[: i + 1]) + ")" for i in range(len(parts)))
    return rule(
        f"!has(self.nodes) || self.nodes <= 1 || !({present} && has(self.{path}.size)) || "
        f"(has(self.{path}.accessModes) && 'ReadWriteMany' in self.{path}.accessModes)",
        f"{label}: with nodes > 1 every pod mounts this claim, so a created claim needs accessModes "
        f"[ReadWriteMany] (or use existingClaim)",
    )


def spec_schema() -> Schema:
    config = config_schema()
    spec = obj(
        "What to train, on what data, with which resources.",
        {
            "image": string("Trainer image. Default: the operator's --trainer-image (chart value trainerImage).",
                            minLength=1, maxLength=512),
            "imagePullPolicy": string("Pull policy of the trainer image.", enum=["Always", "IfNotPresent", "Never"],
                                      default="IfNotPresent"),
            "model": model_schema(),
            "config": config,
            "datasets": datasets_schema(),
            "resources": resources_schema(),
            "nodes": integer("Nodes (pods); more than one runs a JobSet (where installed) or an Indexed Job, with a rendezvous.", minimum=1,
                             maximum=256, default=1),
            "caches": obj("Persistent caches, shareable across TrainingJobs.", {
                "models": volume("Hugging Face model cache (HF_HOME)."),
                "latents": volume("VAE-latent and text-embedding caches."),
            }),
            "output": output_schema(),
            "hooks": hooks_schema(),
            "secrets": secrets_schema(),
            "runPolicy": run_policy_schema(),
            "queueName": string("Kueue LocalQueue; the trainer workload is labelled for it.", maxLength=63,
                                pattern=DNS1123_SUBDOMAIN),
            "metricsPort": integer("Port of the trainer's /metrics and /status.", minimum=1024, maximum=65535,
                                   default=DEFAULT_METRICS_PORT),
            "podTemplate": pod_template_schema(),
        },
        # config is required as soon as some trainer option is (today: optimizer).
        required=["model", "datasets"] + (["config"] if config.get("required") else []),
        rules=[
            rule("!has(self.nodes) || self.nodes <= 1 || "
                 "(has(self.resources) && has(self.resources.gpus) && self.resources.gpus >= 1)",
                 "nodes > 1 needs at least one GPU per node (resources.gpus >= 1)"),
            _rwx_rule("caches.models", "caches.models"),
            _rwx_rule("caches.latents", "caches.latents"),
            _rwx_rule("output.pvc", "output.pvc"),
            # On spec, not on output: a rule on output runs only while an old output exists, so removing
            # output and adding another in a later update would pass.
            rule("has(self.output) == has(oldSelf.output) && (!has(self.output) || self.output == oldSelf.output)",
                 "output cannot change once the TrainingJob exists: resuming needs the checkpoints where they "
                 "were written", fieldPath=".output"),
            *spec_rules(),
        ],
    )
    return spec


def _condition_schema() -> Schema:
    return obj("metav1.Condition.", {
        "type": string("Condition type.", maxLength=316),
        "status": string("True, False or Unknown.", enum=["True", "False", "Unknown"]),
        "observedGeneration": integer("Generation the condition was set for.", format="int64", minimum=0),
        "lastTransitionTime": string("When status last changed.", format="date-time"),
        "reason": string("CamelCase reason.", maxLength=1024),
        "message": string("Human-readable detail.", maxLength=32768),
    }, required=["type", "status", "lastTransitionTime", "reason", "message"])


def status_schema() -> Schema:
    return obj("Observed state, written by the operator.", {
        "phase": string("Lifecycle phase.", enum=PHASES),
        "observedGeneration": integer("Spec generation the status describes.", format="int64"),
        "conditions": array("Ready, Running, Succeeded, Failed, Suspended.", _condition_schema(), maxItems=16,
                            **{"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}),
        "progress": obj("Training progress reported by the trainer.", {
            "step": integer("Optimizer steps done."),
            "maxSteps": integer("Optimizer steps planned."),
            "epoch": integer("Current epoch."),
            "percent": string("step / maxSteps in percent, e.g. \"42.0\".", maxLength=32),
            "loss": string("Latest (smoothed) loss.", maxLength=32),
            "samplesPerSecond": string("Throughput.", maxLength=32),
            "eta": string("Estimated time left.", maxLength=64),
        }),
        "checkpoints": obj("The latest complete checkpoint.", {
            "latestStep": integer("Step of the checkpoint."),
            "latestPath": string("Path of the checkpoint in the output.", maxLength=4096),
            "latestTime": string("When it was written (RFC 3339).", maxLength=64),
        }),
        "hooks": array(f"Hook Jobs by checkpoint: the latest {HOOK_STATUS_LIMIT} (older finished ones are "
                       "counted in hooksCompacted).", obj("One hook run.", {
                           "checkpointStep": integer("Checkpoint step."),
                           "hook": string("Hook name.", maxLength=63),
                           "job": string("Job name.", maxLength=253),
                           "result": string("Outcome of the hook Job.", enum=HOOK_RESULTS),
                       }), maxItems=1024),
        "hooksCompacted": obj("Hook runs folded out of hooks, by result.", {
            "throughStep": integer("Newest checkpoint step whose hooks were folded."),
            "succeeded": integer("Folded hook Jobs that succeeded."),
            "failed": integer("Folded hook Jobs that failed."),
            "unknown": integer("Folded hook Jobs whose outcome was not seen."),
        }, nullable=True),
        "restarts": integer("Trainer restarts so far (crashes and preemptions)."),
        "startTime": string("When training first started.", format="date-time", nullable=True),
        "completionTime": string("When the job finished.", format="date-time", nullable=True),
        "message": string("Human-readable state.", maxLength=32768),
        "kopf": {"type": "object", "description": "Handler bookkeeping of the operator framework.",
                 "x-kubernetes-preserve-unknown-fields": True},
    })


def trainingjob_openapi_schema() -> Schema:
    """The structural ``openAPIV3Schema`` of TrainingJob (spec and status)."""
    return {
        "type": "object",
        "description": "A fine-tuning run of a diffusion model.",
        "properties": {
            "apiVersion": string("API version of this object.", maxLength=253),
            "kind": string("Kind of this object.", maxLength=63),
            "metadata": {"type": "object", "properties": {
                "name": string("TrainingJob name.", maxLength=MAX_NAME_LENGTH, pattern=DNS1123_LABEL),
                # The API server appends 5 random characters to generateName.
                "generateName": string("Prefix of a generated TrainingJob name.",
                                       maxLength=MAX_NAME_LENGTH - GENERATED_SUFFIX_LENGTH,
                                       pattern=r"^[a-z0-9]([-a-z0-9]*)?$")}},
            "spec": spec_schema(),
            "status": status_schema(),
        },
        "required": ["spec"],
    }


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Lifecycle phase."},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.percent",
     "description": "Percent of the planned steps done."},
    {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step", "description": "Steps done."},
    {"name": "Loss", "type": "string", "jsonPath": ".status.progress.loss", "description": "Latest loss."},
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts", "description": "Trainer restarts."},
    {"name": "Family", "type": "string", "jsonPath": ".spec.model.family", "priority": 1,
     "description": "Model family."},
    {"name": "Nodes", "type": "integer", "jsonPath": ".spec.nodes", "priority": 1, "description": "Nodes."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def build_crd() -> dict:
    """The full ``apiextensions.k8s.io/v1`` CustomResourceDefinition of TrainingJob."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/name": "kubetuner", "app.kubernetes.io/part-of": "kubetuner"},
            "annotations": {"kubetuner.dev/generated-by": "kubetuner crd"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": CATEGORIES,
            },
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": PRINTER_COLUMNS,
                "schema": {"openAPIV3Schema": trainingjob_openapi_schema()},
            }],
        },
    }
