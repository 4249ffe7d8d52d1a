"""Where an S3 dataset's credentials come from (never logged)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from .dataset_config import DatasetEntry

_ENV_ID = re.compile(r"[^A-Za-z0-9]")


def credential_env_prefix(dataset_id: str) -> str:
    """``KUBETUNER_DATASET_<ID>_`` with the id upper-cased and non-alphanumerics turned into ``_``."""
    return f"KUBETUNER_DATASET_{_ENV_ID.sub('_', dataset_id).upper()}_"


def resolve_credentials(entry: DatasetEntry, environ: Mapping[str, str]) -> tuple[str | None, str | None, str]:
    """(access key id, secret key, where they came from) for an S3 dataset.

    Order: the entry's own fields, then ``KUBETUNER_DATASET_<ID>_AWS_*`` variables, then (both None) the
    standard AWS chain that boto3 applies by itself (``AWS_ACCESS_KEY_ID``, profiles, instance roles).
    """
    if entry.aws_access_key_id and entry.aws_secret_access_key:
        return entry.aws_access_key_id, entry.aws_secret_access_key, "dataset entry"
    prefix = credential_env_prefix(entry.id)
    key, secret = environ.get(f"{prefix}AWS_ACCESS_KEY_ID"), environ.get(f"{prefix}AWS_SECRET_ACCESS_KEY")
    if key and secret:
        return key, secret, f"environment {prefix}AWS_*"
    return None, None, "default AWS credential chain"
