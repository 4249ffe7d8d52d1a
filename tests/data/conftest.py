"""Shared fixtures for the data pipeline tests: generated images, a real S3 endpoint, tiny encoders."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from data_builders import S3_KEY, S3_SECRET, TinyEncoders, build_tiny_models, make_mixed_files

__all__ = ["TinyEncoders"]


@pytest.fixture
def mixed_dir(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    for name, data in make_mixed_files().items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


# -- S3 ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on loopback (real HTTP), one per test process."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_client(s3_endpoint: str):
    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                        aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET)


@pytest.fixture
def s3_bucket(s3_client, request) -> str:
    name = "kt-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    s3_client.create_bucket(Bucket=name)
    return name


# -- tiny encoders ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture
def encoders(tiny_models: Path) -> TinyEncoders:
    return TinyEncoders(tiny_models)
