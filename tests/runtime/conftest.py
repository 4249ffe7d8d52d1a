"""Fixtures for the runtime tests: configs, loopback HTTP receivers, a real argv-dumping script."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from runtime_helpers import ARGV_DUMPER, Receiver, Recorded, make_cfg

from kubetuner_trainer.config import TrainerConfig


@pytest.fixture
def cfg_factory(tmp_path: Path):
    def factory(**values: Any) -> TrainerConfig:
        return make_cfg(tmp_path, **values)

    return factory


@pytest.fixture
def argv_dumper(tmp_path: Path) -> Path:
    """A real Python script that writes the arguments it receives (after the first) as JSON."""
    script = tmp_path / "dump argv.py"
    script.write_text(ARGV_DUMPER)
    return script


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            with rec.cond:
                rec.requests.append(Recorded("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                rec.cond.notify_all()
            self.send_response(rec.status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    rec.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield rec
    server.shutdown()
    server.server_close()


@pytest.fixture
def dead_endpoint() -> Iterator[str]:
    """A listening socket that never accepts: connections hang until the client's timeout."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
    sock.close()


@pytest.fixture
def fake_hub():
    from runtime_helpers import FakeHub

    hub = FakeHub()
    yield hub
    hub.close()


@pytest.fixture
def s3_server(monkeypatch):
    """A moto S3 server on loopback; boto3 talks to it over real HTTP."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
