"""The trainer's small HTTP server: ``/metrics``, ``/status`` and ``/healthz`` on one port."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..contract import METRICS_PATH, STATUS_PATH, TrainerStatus

log = logging.getLogger(__name__)

HEALTH_PATH = "/healthz"


class StatusServer:
    """Serves the metrics exposition and the status document from a daemon thread.

    ``port=0`` binds a free port; :attr:`port` tells which after :meth:`start`.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        status: Callable[[], TrainerStatus],
        metrics: Callable[[], bytes],
    ) -> None:
        self._host, self._requested_port = host, port
        self._status, self._metrics = status, metrics
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the status server is not running")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = self._host if self._host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        handler = _make_handler(self._status, self._metrics)
        server_class = ThreadingHTTPServer
        if ":" in self._host:
            import socket

            server_class = type("V6Server", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
        try:
            self._httpd = server_class((self._host, self._requested_port), handler)
        except OSError as error:
            raise OSError(
                f"cannot serve metrics/status on {self._host}:{self._requested_port}: {error}; "
                "choose another --metrics_port (0 disables the server)"
            ) from error
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="kubetuner-status-server", daemon=True
        )
        self._thread.start()
        log.info("serving %s, %s and %s at %s", METRICS_PATH, STATUS_PATH, HEALTH_PATH, self.url)

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None


def _make_handler(
    status: Callable[[], TrainerStatus], metrics: Callable[[], bytes]
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "kubetuner-trainer"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == METRICS_PATH:
                self._reply(200, CONTENT_TYPE_LATEST, metrics())
            elif path == STATUS_PATH:
                self._reply(200, "application/json", status().to_json().encode())
            elif path == HEALTH_PATH:
                self._reply(200, "text/plain; charset=utf-8", b"ok\n")
            else:
                self._reply(404, "text/plain; charset=utf-8", b"not found; try /metrics, /status or /healthz\n")

        def do_HEAD(self) -> None:
            self._reply(200 if self.path in (METRICS_PATH, STATUS_PATH, HEALTH_PATH) else 404,
                        "text/plain", b"", head=True)

        def _reply(self, code: int, content_type: str, body: bytes, head: bool = False) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("status server: " + format, *args)

    return Handler
