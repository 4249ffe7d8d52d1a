"""Helpers shared by the runtime tests (fixtures live in conftest.py)."""

from __future__ import annotations

import json
import shlex
import sys
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetuner_trainer.config import EnvSettings, TrainerConfig
from kubetuner_trainer.contract import CheckpointInfo, TrainerState
from kubetuner_trainer.events import StepReport

ARGV_DUMPER = """\
import json, os, sys, uuid
from pathlib import Path
out = Path(sys.argv[1])
if out.is_dir():  # one file per run when several runs may overlap
    out = out / f"{uuid.uuid4().hex}.json"
tmp = out.with_name(out.name + ".tmp")
tmp.write_text(json.dumps(sys.argv[2:]))
tmp.replace(out)  # atomic: the test never reads a half-written file
sys.exit(int(os.environ.get("DUMPER_EXIT", "0")))
"""


def make_cfg(tmp_path: Path, job_id: str | None = None, log_level: str = "INFO", **values: Any) -> TrainerConfig:
    """A real, validated TrainerConfig with ``output_dir`` in ``tmp_path`` and a 10-step budget."""
    base = {"output_dir": str(tmp_path / "out"), "max_train_steps": 10, "metrics_port": 0}
    base.update(values)
    env = EnvSettings(log_level=log_level, job_id=job_id)
    return TrainerConfig.from_mapping(base, require=False, env=env)


def python_command(*args: str) -> str:
    """A shell-quoted command line running this interpreter (paths may contain spaces)."""
    return shlex.join([sys.executable, *args])


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """A loopback HTTP server that records every request and answers 200 (or ``status``)."""

    url: str
    requests: list[Recorded] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    status: int = 200

    def wait_for(self, predicate, timeout: float = 30.0) -> list[Recorded]:
        with self.cond:
            ok = self.cond.wait_for(lambda: predicate(self.requests), timeout)
            assert ok, f"receiver never saw the expected requests; got {[r.path for r in self.requests]}"
            return list(self.requests)


def http_get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.status, reply.headers.get("Content-Type", ""), reply.read()


def step_report(step: int, max_steps: int = 10, **extra: Any) -> StepReport:
    values: dict[str, Any] = dict(
        step=step, max_steps=max_steps, epoch=1, max_epochs=2, loss=1.0 / step,
        loss_components={"mse": 0.9 / step, "prior": 0.1 / step},
        learning_rates={"unet": 1e-4, "text_encoder": 5e-5},
        samples_per_second=4.0, seconds_per_step=0.5, data_wait_seconds=0.01, grad_norm=0.25,
    )
    values.update(extra)
    return StepReport(**values)


def write_checkpoint(output_dir: Path, step: int) -> CheckpointInfo:
    """A small checkpoint folder like the loop writes, with a nested file."""
    path = output_dir / f"checkpoint-{step}"
    (path / "unet").mkdir(parents=True, exist_ok=True)
    (path / "unet" / "weights.bin").write_bytes(bytes(range(64)) * step)
    (path / "training_state.json").write_text(json.dumps({"global_step": step}))
    (path / "COMPLETE").write_text("{}")
    return CheckpointInfo(step=step, path=str(path), time="2026-01-01T00:00:00Z", complete=True)


def drive(events, output_dir: Path, steps: int = 4, checkpoint_every: int = 2, max_steps: int = 10) -> None:
    """A scripted fake training loop speaking the TrainingEvents interface."""
    events.state(TrainerState.CACHING, "encoding latents")
    events.state(TrainerState.TRAINING)
    for step in range(1, steps + 1):
        events.step(step_report(step, max_steps=max_steps))
        if step % checkpoint_every == 0:
            events.state(TrainerState.CHECKPOINTING)
            events.checkpoint(write_checkpoint(output_dir, step), seconds=0.2)
            events.state(TrainerState.TRAINING)


class FakeHub:
    """Just enough of the Hugging Face Hub HTTP API for create_repo + upload_folder, on loopback.

    Records every request; files committed end up in ``files[repo_id][path] = bytes``.
    """

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        hub = self
        self.requests: list[Recorded] = []
        self.created: list[dict] = []
        self.commits: list[dict] = []
        self.files: dict[str, dict[str, bytes]] = {}

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                hub.requests.append(Recorded("POST", self.path, {k.lower(): v for k, v in self.headers.items()},
                                             body))
                reply, code = hub.answer(self.path.split("?")[0], body)
                data = json.dumps(reply).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def answer(self, path: str, body: bytes) -> tuple[dict, int]:
        import base64
        import re

        if path == "/api/repos/create":
            request = json.loads(body)
            self.created.append(request)
            return {"url": f"{self.url}/{request['organization']}/{request['name']}"}, 200
        if path == "/api/validate-yaml":
            return {"errors": [], "warnings": []}, 200
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)
        if match and match.group(2) == "preupload":
            files = json.loads(body)["files"]
            return {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                              for f in files]}, 200
        if match:
            repo = match.group(1)
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            self.commits.append({"repo": repo, "header": lines[0]["value"]})
            for line in lines[1:]:
                value = line["value"]
                self.files.setdefault(repo, {})[value["path"]] = base64.b64decode(value["content"])
            oid = f"{len(self.commits):040x}"
            return {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid}, 200
        return {"error": f"fake hub does not know {path}"}, 404

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def wandb_records(run_file: Path) -> list[Any]:
    """Decode a W&B run file (``run-<id>.wandb``): a LevelDB-style log of ``Record`` protobufs.

    Layout (wandb's datastore): a 7-byte file header, then 32 KiB blocks of chunks, each with a
    7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last); block tails under
    7 bytes are padding.
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(run_file: Path) -> list[dict[str, Any]]:
    """The logged history rows of a W&B run file, values JSON-decoded, keys joined with ``/``."""
    rows = []
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def comet_messages(archive: Path) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """The messages of a Comet offline archive and the other files in it (uploaded media)."""
    import zipfile

    with zipfile.ZipFile(archive) as zf:
        messages = [json.loads(line) for line in zf.read("messages.json").decode().splitlines() if line.strip()]
        files = {name: zf.read(name) for name in zf.namelist() if name not in ("messages.json", "experiment.json")}
    return messages, files
