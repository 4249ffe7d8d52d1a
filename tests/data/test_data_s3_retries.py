"""S3 transient failures are retried: a loopback proxy answers 503 a few times before passing through."""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pytest
from data_builders import S3_KEY, S3_SECRET

from kubetuner_trainer.data.storage.s3 import S3Storage


class FlakyProxy:
    """Forwards to the S3 endpoint; the first ``failures`` requests whose query contains ``match`` get 503."""

    def __init__(self, upstream: str, match: str, failures: int):
        target = urlparse(upstream)
        self.failures_left = failures
        self.failed = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy.lock:
                    fail = match in self.path and proxy.failures_left > 0
                    if fail:
                        proxy.failures_left -= 1
                        proxy.failed += 1
                if fail:
                    payload = b"<Error><Code>SlowDown</Code><Message>try later</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = target.netloc
                conn.request(self.command, self.path, body=body or None, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def objects(s3_client, s3_bucket):
    for i in range(7):
        s3_client.put_object(Bucket=s3_bucket, Key=f"p/obj{i}.bin", Body=f"payload {i}".encode())
    return s3_bucket


@pytest.mark.parametrize("botocore_attempts", [1, 5])
def test_listing_survives_503s(s3_endpoint, objects, botocore_attempts):
    # botocore_attempts=1 leaves the retries to our own loop; 5 lets botocore's standard mode absorb them.
    proxy = FlakyProxy(s3_endpoint, "list-type=2", failures=3)
    try:
        storage = S3Storage(objects, "p", endpoint_url=proxy.url, region="us-east-1", access_key_id=S3_KEY,
                            secret_access_key=S3_SECRET, max_attempts=botocore_attempts, page_size=2)
        keys = [o.key for o in storage.list()]
    finally:
        proxy.close()
    assert keys == [f"obj{i}.bin" for i in range(7)]
    assert proxy.failed == 3


def test_reads_and_writes_retry_and_permanent_errors_do_not(s3_endpoint, objects):
    proxy = FlakyProxy(s3_endpoint, "obj", failures=2)
    try:
        storage = S3Storage(objects, "p", endpoint_url=proxy.url, region="us-east-1", access_key_id=S3_KEY,
                            secret_access_key=S3_SECRET, max_attempts=1)
        assert storage.read("obj3.bin") == b"payload 3"
        assert storage.read_range("obj4.bin", 2, 4) == b"yloa"
        storage.write("new/obj-x.bin", b"fresh")
        assert storage.read("new/obj-x.bin") == b"fresh"
        with pytest.raises(FileNotFoundError):
            storage.read("missing.bin")
    finally:
        proxy.close()
    assert proxy.failed == 2


def test_credentials_are_not_in_repr(s3_endpoint, objects):
    storage = S3Storage(objects, "p", endpoint_url=s3_endpoint, access_key_id=S3_KEY, secret_access_key=S3_SECRET)
    assert S3_SECRET not in repr(storage) and S3_KEY not in repr(storage)
    assert storage.describe() == f"s3://{objects}/p/ at {s3_endpoint}"
