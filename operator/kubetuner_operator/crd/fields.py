"""Small builders for the OpenAPI v3 schema nodes the TrainingJob CRD repeats.

Every node is structural (typed), so the API server can prune, default and validate it.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
ENV_VAR_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
# resource.Quantity as accepted by the API server (non-negative forms only; a leading + is allowed).
QUANTITY = r"^\+?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
# A qualified resource name such as nvidia.com/gpu or amd.com/gpu.
QUALIFIED_NAME = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"


def string(description: str, **extra: Any) -> Schema:
    return {"type": "string", "description": description, **extra}


def integer(description: str, **extra: Any) -> Schema:
    return {"type": "integer", "description": description, **extra}


def boolean(description: str, **extra: Any) -> Schema:
    return {"type": "boolean", "description": description, **extra}


def obj(description: str, properties: dict[str, Schema], *, required: list[str] | None = None,
        rules: list[dict[str, str]] | None = None, **extra: Any) -> Schema:
    node: Schema = {"type": "object", "description": description, "properties": properties}
    if required:
        node["required"] = required
    if rules:
        node["x-kubernetes-validations"] = rules
    node.update(extra)
    return node


def array(description: str, items: Schema, **extra: Any) -> Schema:
    return {"type": "array", "description": description, "items": items, **extra}


LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"


def string_map(description: str, *, label_values: bool = False, reserved_prefixes: tuple[str, ...] = (),
               **extra: Any) -> Schema:
    """A map of string to string (labels, annotations, nodeSelector).

    Keys are only checked against reserved prefixes: OpenAPI cannot bound a map key's length, so
    the API server would price a regex over keys beyond its CEL cost budget (startsWith is priced
    by the prefix only). Key syntax is checked by the API server when the operator creates the pod.
    """
    values: Schema = {"type": "string", "maxLength": 4096}
    if label_values:
        values.update(maxLength=63, pattern=LABEL_VALUE)
    node: Schema = {"type": "object", "description": description, "additionalProperties": values,
                    "maxProperties": 64, **extra}
    if reserved_prefixes:
        node["x-kubernetes-validations"] = [
            rule(f"self.all(k, !k.startsWith('{prefix}'))", f"keys starting with {prefix} are set by the operator")
            for prefix in reserved_prefixes
        ]
    return node


def rule(expression: str, message: str, **extra: str) -> dict[str, str]:
    """One x-kubernetes-validations entry (a CEL rule evaluated by the API server)."""
    return {"rule": expression, "message": message, **extra}


def quantity(description: str, **extra: Any) -> Schema:
    """A Kubernetes resource quantity: an integer or a string such as "500m" or "64Gi"."""
    return {
        "description": description,
        "x-kubernetes-int-or-string": True,
        # The exact int-or-string pattern a structural schema allows; the checks sit beside it.
        "anyOf": [{"type": "integer"}, {"type": "string"}],
        "pattern": QUANTITY,
        "minimum": 0,
        **extra,
    }


def secret_key_ref(description: str, default_key: str | None = None) -> Schema:
    key = string("Key inside the Secret.", minLength=1, maxLength=253, pattern=r"^[-._a-zA-Z0-9]+$")
    if default_key is not None:
        key["default"] = default_key
    return obj(
        description,
        {"name": string("Name of a Secret in the TrainingJob's namespace.", minLength=1, maxLength=253,
                        pattern=DNS1123_SUBDOMAIN),
         "key": key},
        required=["name"] if default_key is not None else ["name", "key"],
    )


def credentials_secret(description: str) -> Schema:
    """A Secret holding S3 credentials under AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (names adjustable)."""
    return obj(
        description,
        {
            "name": string("Name of a Secret in the TrainingJob's namespace.", minLength=1, maxLength=253,
                           pattern=DNS1123_SUBDOMAIN),
            "accessKeyIdKey": string("Key holding the access key id.", default="AWS_ACCESS_KEY_ID",
                                     minLength=1, maxLength=253, pattern=r"^[-._a-zA-Z0-9]+$"),
            "secretAccessKeyKey": string("Key holding the secret access key.", default="AWS_SECRET_ACCESS_KEY",
                                         minLength=1, maxLength=253, pattern=r"^[-._a-zA-Z0-9]+$"),
        },
        required=["name"],
    )


def resource_requirements(description: str) -> Schema:
    """corev1.ResourceRequirements limited to limits/requests (quantities by resource name)."""
    per_resource = {"type": "object", "additionalProperties": quantity("A quantity."),
                    "maxProperties": 16}
    return obj(description, {
        "limits": {**per_resource, "description": "Upper bounds, by resource name."},
        "requests": {**per_resource, "description": "Guaranteed amounts, by resource name."},
    })


ACCESS_MODES = ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]


def volume(description: str) -> Schema:
    """A volume the operator either takes as is (existingClaim) or creates (size + class + modes)."""
    return obj(
        description,
        {
            "existingClaim": string("Use this existing PersistentVolumeClaim.", minLength=1, maxLength=253,
                                    pattern=DNS1123_SUBDOMAIN),
            "size": quantity("Create a PersistentVolumeClaim of this size (e.g. 100Gi)."),
            "storageClassName": string("Storage class of the created claim; the cluster default when unset.",
                                       maxLength=253, pattern=DNS1123_SUBDOMAIN),
            "accessModes": array("Access modes of the created claim (ReadWriteOnce when unset).",
                                 {"type": "string", "enum": ACCESS_MODES},
                                 minItems=1, maxItems=4, **{"x-kubernetes-list-type": "set"}),
        },
        rules=[
            rule("has(self.existingClaim) != has(self.size)",
                 "set exactly one of existingClaim (use an existing claim) or size (create a claim)"),
            rule("!has(self.existingClaim) || (!has(self.storageClassName) && !has(self.accessModes))",
                 "storageClassName and accessModes only apply to a claim created from size, not to existingClaim"),
        ],
    )


def claim_path() -> Schema:
    """A relative folder inside a mounted claim (like a volume subPath)."""
    return string("Folder inside the claim, relative to its root.", maxLength=1024,
                  **{"x-kubernetes-validations": [
                      rule("!self.startsWith('/') && !self.contains('..')",
                           "path must be relative to the claim and must not contain '..'")]})


def claim_ref(description: str) -> Schema:
    """An existing PersistentVolumeClaim and a folder inside it."""
    return obj(description, {
        "claimName": string("An existing PersistentVolumeClaim.", minLength=1, maxLength=253,
                            pattern=DNS1123_SUBDOMAIN),
        "path": claim_path(),
    }, required=["claimName"])
