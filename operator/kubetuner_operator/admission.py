"""What kubetuner refuses beyond the CRD schema: one function for the webhook, the reconciler, ``kubetuner crd
--validate`` and ``kubetuner run``, so that all of them agree.

``validate_all(obj)`` = the API server's checks (``crd.validation``) and, when those pass, ``policy_problems``:

* the trainer's own torch-free validation of the translated ``config.json`` and ``multidatabackend.json``
  (option types, cross-option rules, implemented-or-not, the dataset list), each problem mapped back to the
  TrainingJob field it came from;
* Kubernetes syntax the CRD schema cannot express (label/annotation keys and resource names are map keys,
  which OpenAPI cannot constrain and CEL could only check at a cost the API server refuses);
* literal credentials anywhere in options, hook env values or arguments, judged by the value;
* pod annotations that change the pod's security profile;
* the size of the trainer pod's annotations, which carry the rendered files (the API server allows 256 KiB);
* the cluster's tenancy policy (allowed images and ServiceAccounts, see :class:`TenancyPolicy`).

Every message starts with the field path, like the API server's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .owned_options import OWNED_OPTIONS

# Nesting beyond this is refused before any recursive code runs (the deepest TrainingJob field is ~10 levels).
MAX_DEPTH = 64
# Values beyond this many nodes are refused before any other check (a YAML alias bomb expands to billions).
MAX_NODES = 100_000
INT64 = (-(2**63), 2**63 - 1)
# apimachinery ValidateAnnotationsSize (TotalAnnotationSizeLimitB): keys and values of one object together,
# less room for what other controllers add to the trainer pod (the Job and JobSet controllers, Kueue, a mesh).
ANNOTATIONS_MAX_BYTES = 256 * 1024 - 16 * 1024

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
# Pod annotations that weaken or replace the pod's security profile (Pod Security Standards, baseline).
SECURITY_ANNOTATION_PREFIXES = (
    "container.apparmor.security.beta.kubernetes.io/",
    "apparmor.security.beta.kubernetes.io/",
    "seccomp.security.alpha.kubernetes.io/",
    "container.seccomp.security.alpha.kubernetes.io/",
    "security.alpha.kubernetes.io/",
    "io.kubernetes.cri-o.",
)
# Formats of credentials that never belong in a manifest: judged by the value, not by the field's name.
CREDENTIAL_PATTERNS = {
    "an AWS access key id": r"\b(AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|A3T[A-Z0-9])[A-Z0-9]{16}\b",
    "a Hugging Face token": r"\bhf_[A-Za-z0-9]{30,}\b",
    "a GitHub token": r"\b(gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{40,})\b",
    "a Slack token": r"\bxox[abprs]-[A-Za-z0-9-]{10,}",
    "an API secret key": r"\bsk-[A-Za-z0-9_-]{20,}",
    "a Google API key": r"\bAIza[0-9A-Za-z_-]{35}\b",
    "a private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "a JSON web token": r"\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.",
    # Bounded repetitions only: this runs on user input in the webhook (no super-linear backtracking).
    "a password in a URL": r"\b[a-z][a-z0-9+.-]{0,15}://[^/\s:@]{1,128}:[^/\s@]{1,128}@",
}
_CREDENTIAL = re.compile("|".join(f"(?P<c{i}>{p})" for i, p in enumerate(CREDENTIAL_PATTERNS.values())))
# Keys of JSON-valued options (publishing_config, webhook_config, ...) that hold a credential by meaning;
# each has an ``<key>_env`` indirection naming an environment variable (from spec.secrets.env).
CREDENTIAL_KEYS = frozenset({"access_key", "secret_key", "access_key_id", "secret_access_key", "aws_access_key_id",
                             "aws_secret_access_key", "aws_session_token", "session_token", "token", "hub_token",
                             "api_key", "auth_token", "password", "secret", "authorization", "x-api-key",
                             "proxy-authorization", "cookie"})


@dataclass(frozen=True)
class TenancyPolicy:
    """What one namespace's TrainingJobs may use (chart values ``tenancy.*``).

    Empty tuples allow everything. ``allowed_images`` holds image prefixes (``registry/``,
    ``registry/repo:``); ``allowed_service_accounts`` names ServiceAccounts the trainer pods may run as
    (the namespace's ``default`` is always allowed).
    """

    allowed_images: tuple[str, ...] = ()
    allowed_service_accounts: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> TenancyPolicy:
        """From ``KUBETUNER_ALLOWED_IMAGES`` / ``KUBETUNER_ALLOWED_SERVICE_ACCOUNTS`` (comma-separated)."""
        def split(name: str) -> tuple[str, ...]:
            return tuple(v.strip() for v in environ.get(name, "").split(",") if v.strip())

        return cls(split("KUBETUNER_ALLOWED_IMAGES"), split("KUBETUNER_ALLOWED_SERVICE_ACCOUNTS"))


def validate_all(obj: Any, *, old: Mapping[str, Any] | None = None, policy: TenancyPolicy | None = None,
                 strict: bool = True) -> list[str]:
    """Every reason to refuse ``obj`` (a TrainingJob) at admission ([] = accepted); never raises."""
    from .crd.validation import validate_trainingjob

    shape = shape_problems(obj)
    if shape:
        return shape
    problems = validate_trainingjob(obj, old=dict(old) if old else None, strict=strict)
    if problems:
        return problems
    return policy_problems(obj, policy)


def shape_problems(obj: Any, path: str = "") -> list[str]:
    """Values no API client can send: nesting beyond MAX_DEPTH, more than MAX_NODES values, integers beyond
    int64 (iterative)."""
    stack: list[tuple[Any, str, int]] = [(obj, path, 0)]
    problems: list[str] = []
    visited = 0
    while stack:
        value, where, depth = stack.pop()
        visited += 1
        if visited > MAX_NODES:
            return [f"{path or '<root>'}: Too long: more than {MAX_NODES} values (the API server limits requests "
                    "to 3 MiB)"]
        if depth > MAX_DEPTH:
            shown = where if len(where) <= 120 else where[:117] + "..."
            return [f"{shown}: Invalid value: nested more than {MAX_DEPTH} levels deep"]
        if isinstance(value, bool):
            continue
        if isinstance(value, int) and not INT64[0] <= value <= INT64[1]:
            problems.append(f"{where or '<root>'}: Invalid value: {value}: must fit in a 64-bit integer")
        elif isinstance(value, dict):
            stack.extend((v, f"{where}.{k}" if where else str(k), depth + 1) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value))
    return sorted(problems)


def policy_problems(obj: Mapping[str, Any], policy: TenancyPolicy | None = None) -> list[str]:
    """Problems of a schema-valid TrainingJob beyond the CRD (see the module docstring)."""
    from .crd.defaults import apply_defaults
    from .spec import SpecError, parse_training_job

    obj = apply_defaults(obj)
    spec = obj.get("spec") or {}
    problems = syntax_problems(spec) + credential_problems(spec) + tenancy_problems(spec, policy or TenancyPolicy())
    try:
        job = parse_training_job(obj)
    except SpecError as error:
        return problems + [str(error)]
    return problems + trainer_problems(job) + annotation_problems(job)


# --- Kubernetes syntax the schema cannot express ------------------------------------------------------

def qualified_name_problem(key: str) -> str | None:
    """Why ``key`` is not a qualified name (label/annotation key, resource name), or None."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix)):
        return "prefix must be a DNS-1123 subdomain (lower case, at most 253 characters)"
    if not name or len(name) > 63 or not _QUALIFIED_NAME.match(name):
        return ("name part must be at most 63 characters of alphanumerics, '-', '_' or '.', "
                "starting and ending with an alphanumeric")
    return None


def syntax_problems(spec: Mapping[str, Any]) -> list[str]:
    """Map keys checked like the API server checks them when the operator creates the pod or Job."""
    tpl = spec.get("podTemplate") or {}
    problems = []
    for field in ("nodeSelector", "labels", "annotations"):
        for key in (tpl.get(field) or {}):
            reason = qualified_name_problem(key)
            if reason:
                problems.append(f"spec.podTemplate.{field}: Invalid value: {json.dumps(key)}: {reason}")
    for key in (tpl.get("annotations") or {}):
        if key.startswith(SECURITY_ANNOTATION_PREFIXES):
            problems.append(f"spec.podTemplate.annotations: Forbidden: {json.dumps(key)}: annotations that set the "
                            "pod's AppArmor/seccomp profile are not allowed; the operator runs pods under the "
                            "restricted Pod Security Standard")
    for resources, where in _resource_maps(spec):
        for kind in ("limits", "requests"):
            for key in (resources.get(kind) or {}):
                reason = qualified_name_problem(key)
                if reason:
                    problems.append(f"{where}.{kind}: Invalid value: {json.dumps(key)}: resource name: {reason}")
    return problems


def _resource_maps(spec: Mapping[str, Any]) -> Iterator[tuple[Mapping[str, Any], str]]:
    for index, hook in enumerate((spec.get("hooks") or {}).get("postCheckpoint") or ()):
        yield hook.get("resources") or {}, f"spec.hooks.postCheckpoint[{index}].resources"


# --- credentials --------------------------------------------------------------------------------------

def credential_kind(text: str) -> str | None:
    """What kind of credential ``text`` contains (by its format), or None."""
    match = _CREDENTIAL.search(text)
    if match is None:
        return None
    index = int(match.lastgroup[1:]) if match.lastgroup else 0
    return list(CREDENTIAL_PATTERNS)[index]


def credential_problems(spec: Mapping[str, Any]) -> list[str]:
    """Literal credentials in options, hook env values and hook arguments."""
    problems = []
    for path, key, value in _strings(spec.get("config") or {}, "spec.config"):
        if key.lower() in CREDENTIAL_KEYS and value.strip():
            problems.append(f"{path}: Forbidden: a literal credential: use the _env form (access_key_env, "
                            "secret_key_env, api_key_env) naming a variable that spec.secrets.env fills from a Secret")
            continue
        kind = credential_kind(value)
        if kind:
            problems.append(f"{path}: Forbidden: looks like {kind}: put it in a Secret and pass it with "
                            "spec.secrets.env")
    for index, hook in enumerate((spec.get("hooks") or {}).get("postCheckpoint") or ()):
        where = f"spec.hooks.postCheckpoint[{index}]"
        for number, arg in enumerate(hook.get("command") or ()):
            kind = credential_kind(arg)
            if kind:
                problems.append(f"{where}.command[{number}]: Forbidden: looks like {kind}: pass it in env with "
                                "valueFrom.secretKeyRef")
        for number, env in enumerate(hook.get("env") or ()):
            kind = credential_kind(env.get("value") or "")
            if kind:
                problems.append(f"{where}.env[{number}].value: Forbidden: looks like {kind}: use "
                                "valueFrom.secretKeyRef")
    return problems


def _strings(value: Any, path: str, key: str = "") -> Iterator[tuple[str, str, str]]:
    """(path, key, text) of every string leaf, iteratively."""
    stack = [(value, path, key)]
    while stack:
        item, where, name = stack.pop()
        if isinstance(item, str):
            yield where, name, item
        elif isinstance(item, dict):
            stack.extend((v, f"{where}.{k}", str(k)) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, f"{where}[{i}]", name) for i, v in enumerate(item))


# --- tenancy --------------------------------------------------------------------------------------------

def tenancy_problems(spec: Mapping[str, Any], policy: TenancyPolicy) -> list[str]:
    """Images and ServiceAccounts outside the cluster's policy."""
    problems = []
    if policy.allowed_images:
        images = [("spec.image", spec.get("image"))] + [
            (f"spec.hooks.postCheckpoint[{i}].image", h.get("image"))
            for i, h in enumerate((spec.get("hooks") or {}).get("postCheckpoint") or ())]
        for where, image in images:
            if image and not str(image).startswith(policy.allowed_images):
                problems.append(f"{where}: Forbidden: {json.dumps(image)}: images must start with one of: "
                                f"{', '.join(policy.allowed_images)}")
    account = (spec.get("podTemplate") or {}).get("serviceAccountName")
    if account and account != "default" and policy.allowed_service_accounts and \
            account not in policy.allowed_service_accounts:
        problems.append(f"spec.podTemplate.serviceAccountName: Forbidden: {json.dumps(account)}: allowed: "
                        f"default, {', '.join(policy.allowed_service_accounts)}")
    return problems


# --- the trainer's own validation ------------------------------------------------------------------------

def trainer_problems(job: Any) -> list[str]:
    """The trainer's torch-free checks on the translated config.json and multidatabackend.json
    (options, cross-option rules, the dataset list, and which datasets are held out for evaluation)."""
    from kubetuner_trainer.config.errors import ConfigError
    from kubetuner_trainer.config.trainer_config import Layer, resolve
    from kubetuner_trainer.data.dataset_config import parse_dataset_config
    from kubetuner_trainer.data.eval_split import split_eval_problems
    from kubetuner_trainer.data.settings import settings_from_config

    from .trainer_config import POD_PATHS, render_trainer_files

    files = render_trainer_files(job, POD_PATHS, resume=False)
    try:
        config = resolve([Layer("spec", files.config_json)])
    except ConfigError as error:
        return [_config_message(p) for p in error.problems]
    try:
        datasets = parse_dataset_config(files.databackend_json, settings_from_config(config))
    except ConfigError as error:
        ids = [d.id for d in job.datasets]
        return [_dataset_message(p, ids) for p in error.problems]
    return [_config_message(p) for p in split_eval_problems(config, datasets)]


def _config_message(problem: Any) -> str:
    from .crd.config_schema import OWNED_BY

    name = problem.option
    where = OWNED_BY.get(name, "spec") if name in OWNED_OPTIONS else f"spec.config.{name}"
    where = where if where.startswith("spec") else "spec"
    return f"{where}: {_problem_text(problem)}"


def _dataset_message(problem: Any, ids: list[str]) -> str:
    match = re.match(r"^datasets\[([^\]]+)\](.*)$", problem.option)
    if match and match.group(1) in ids:
        where = f"spec.datasets[{ids.index(match.group(1))}]{match.group(2)}"
    elif match:
        where = f"spec.datasets{match.group(2)}"
    else:
        where = "spec.datasets" if problem.option == "data_backend_config" else f"spec.config.{problem.option}"
    return f"{where}: {_problem_text(problem)}"


def _problem_text(problem: Any) -> str:
    from kubetuner_trainer.config.errors import MISSING

    if problem.value is MISSING or problem.value is None:
        return problem.message
    shown = json.dumps(problem.value, default=str)
    return f"Invalid value: {shown if len(shown) <= 120 else shown[:117] + '...'}: {problem.message}"


# --- object size -----------------------------------------------------------------------------------------

def annotation_problems(job: Any) -> list[str]:
    """The trainer pod's annotations (the user's, plus config.json and multidatabackend.json, see
    ``builders.trainer_files``) must fit the API server's 256 KiB limit."""
    from .builders.trainer_pod import pod_annotations

    size = annotations_size(pod_annotations(job))
    if size > ANNOTATIONS_MAX_BYTES:
        return [f"spec.config: Too long: the trainer pod's annotations, which carry its config.json and "
                f"multidatabackend.json, would take {size} bytes; at most {ANNOTATIONS_MAX_BYTES} are allowed (the "
                "API server's 256 KiB, less room for annotations other controllers add): shorten prompts, JSON "
                "options or spec.podTemplate.annotations"]
    return []


def annotations_size(annotations: Mapping[str, str]) -> int:
    """Bytes of an object's annotations as the API server counts them (keys and values, UTF-8)."""
    return sum(len(k.encode()) + len(str(v).encode()) for k, v in annotations.items())
