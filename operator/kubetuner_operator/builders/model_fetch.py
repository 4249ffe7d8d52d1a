"""Init container that copies an S3 model source into the model cache before training.

It runs a short Python program with the trainer image (which ships boto3). Files already present
with the same size are skipped, so a shared model cache is downloaded once.
"""

from __future__ import annotations

from typing import Any

from ..spec import TrainingJobSpec
from ..trainer_config import POD_PATHS, MountPaths
from .common import container_security_context

FETCH_PROGRAM = """\
import os, sys, boto3
uri, target = sys.argv[1], sys.argv[2]
bucket, _, prefix = uri[len("s3://"):].partition("/")
s3 = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None,
                  region_name=os.environ.get("AWS_REGION") or None)
count = 0
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
    for item in page.get("Contents", []):
        rel = item["Key"][len(prefix):].lstrip("/")
        if not rel or rel.endswith("/"):
            continue
        dest = os.path.join(target, rel)
        if os.path.isfile(dest) and os.path.getsize(dest) == item["Size"]:
            continue
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        s3.download_file(bucket, item["Key"], dest + ".part")
        os.replace(dest + ".part", dest)
        count += 1
if not os.path.isdir(target):
    sys.exit(f"no objects under {uri}")
print(f"fetched {count} file(s) from {uri} into {target}")
"""


def fetch_argv(uri: str, target: str) -> list[str]:
    return ["python", "-c", FETCH_PROGRAM, uri, target]


def model_fetch_init_container(job: TrainingJobSpec, mounts: list[dict[str, Any]],
                               paths: MountPaths = POD_PATHS) -> dict[str, Any] | None:
    """None unless the model comes from S3."""
    src = job.model.source
    if src.kind != "s3":
        return None
    env: list[dict[str, Any]] = [{"name": "HOME", "value": "/tmp"}]
    if src.s3_endpoint_url:
        env.append({"name": "AWS_ENDPOINT_URL", "value": src.s3_endpoint_url})
    if src.s3_region:
        env.append({"name": "AWS_REGION", "value": src.s3_region})
    if src.s3_credentials:
        cred = src.s3_credentials
        env += [{"name": "AWS_ACCESS_KEY_ID",
                 "valueFrom": {"secretKeyRef": {"name": cred.name, "key": cred.access_key_id_key}}},
                {"name": "AWS_SECRET_ACCESS_KEY",
                 "valueFrom": {"secretKeyRef": {"name": cred.name, "key": cred.secret_access_key_key}}}]
    return {
        "name": "fetch-model",
        "image": job.image,
        "imagePullPolicy": job.image_pull_policy,
        "command": fetch_argv(src.s3_uri, paths.s3_model_dir(src.s3_uri)),
        "env": env,
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
    }
