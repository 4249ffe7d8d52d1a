"""Real CPU training runs of ``kubetuner-train`` with a tiny SD 1.x model: the runtime end to end.

The trainer runs as a subprocess, the way the pod runs it. The tests poll its ``/status``
endpoint (no sleeping for timing) and stop it with a real SIGTERM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from runtime_helpers import http_get, python_command

from kubetuner_trainer.contract import ExitCode, TrainerState, TrainerStatus

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory) -> dict[str, Path]:
    from kubetuner_trainer.tiny import build_tiny_dataset, build_tiny_sd1x

    root = tmp_path_factory.mktemp("assets")
    return {"model": build_tiny_sd1x(root / "model"), "images": build_tiny_dataset(root / "images", count=4)}


def free_port() -> int:
    """A port that is free right now (the subprocess binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(tmp_path: Path, assets: dict[str, Path], **overrides) -> tuple[Path, str]:
    datasets = [
        {"id": "tiny", "type": "local", "instance_data_dir": str(assets["images"]), "caption_strategy": "textfile",
         "resolution": 64, "resolution_type": "pixel", "cache_dir_vae": str(tmp_path / "cache" / "vae")},
        {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": True,
         "cache_dir": str(tmp_path / "cache" / "text")},
    ]
    backend = tmp_path / "multidatabackend.json"
    backend.write_text(json.dumps(datasets))
    port = free_port()
    config = {
        "model_family": "sd1x", "model_type": "lora", "pretrained_model_name_or_path": str(assets["model"]),
        "output_dir": str(tmp_path / "output"), "data_backend_config": str(backend),
        "optimizer": "adamw_bf16", "learning_rate": 1e-3, "train_batch_size": 1, "resolution": 64,
        "lora_rank": 2, "seed": 1, "metrics_port": port, "metrics_host": "127.0.0.1",
    }
    config.update(overrides)
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*.json')))}.json"
    path.write_text(json.dumps(config))
    return path, f"http://127.0.0.1:{port}"


def start(config: Path, tmp_path: Path, job_id: str = "job-1") -> subprocess.Popen:
    exe = shutil.which("kubetuner-train") or str(Path(sys.executable).with_name("kubetuner-train"))
    env = {**os.environ, "SIMPLETUNER_JOB_ID": job_id, "SIMPLETUNER_LOG_LEVEL": "INFO"}
    log_path = tmp_path / f"{config.stem}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([exe, "--config", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                   env=env, cwd=tmp_path)
    process.log_path = log_path
    return process


def log_tail(process: subprocess.Popen) -> str:
    return process.log_path.read_text(errors="replace")[-4000:]


def poll_status(url: str, process: subprocess.Popen, until, limit: float = 240) -> TrainerStatus:
    """Poll ``/status`` until ``until(status)``; fail if the process exits first."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"trainer exited with {process.returncode} before the expected status:\n{log_tail(process)}")
        try:
            status = TrainerStatus.from_json(http_get(url + "/status")[2])
            if until(status):
                return status
        except (urllib.error.URLError, ConnectionError):
            pass  # not serving yet
        time.sleep(0.05)  # polling interval, not a timing assumption
    pytest.fail("the expected status never appeared")


def finish(process: subprocess.Popen, expected: int) -> None:
    code = process.wait(timeout=600)
    assert code == expected, f"exit code {code}, expected {expected}:\n{log_tail(process)}"


def test_tiny_run_reports_over_http_webhooks_scripts_and_tensorboard(tiny_assets, tmp_path, receiver,
                                                                      argv_dumper):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    config, url = write_config(
        tmp_path, tiny_assets, max_train_steps=2, checkpoint_step_interval=1, report_to="tensorboard",
        webhook_config=[{"webhook_type": "raw", "callback_url": receiver.url, "api_key": "k"}],
        webhook_reporting_interval=1,
        post_checkpoint_script=python_command(str(argv_dumper), str(hooks), "{local_checkpoint_path}",
                                              "{global_step}", "{model_family}"),
        validation_prompt="a tiny test", validation_step_interval=2, validation_num_inference_steps=2,
        validation_resolution="32",
    )
    process = start(config, tmp_path)
    status = poll_status(url, process, lambda s: s.step >= 1)
    assert status.max_steps == 2 and status.job_id == "job-1"
    families = {f.name: f for f in text_string_to_metric_families(http_get(url + "/metrics")[2].decode())}
    assert families["kubetuner_trainer_step"].samples[0].value >= 1
    assert any(s.labels.get("component") == "total" for s in families["kubetuner_trainer_loss"].samples)
    finish(process, ExitCode.SUCCESS)

    output = tmp_path / "output"
    events = [r.json() for r in receiver.requests]
    saved = [e["data"]["step"] for e in events if e["type"] == "training.checkpoint"]
    assert 1 in saved and all((output / f"checkpoint-{step}" / "COMPLETE").exists() for step in saved)
    calls = sorted(json.loads(p.read_text()) for p in hooks.glob("*.json"))
    assert calls == [[str(output / f"checkpoint-{step}"), str(step), "sd1x"] for step in sorted(saved)]
    stages = [e["data"]["stage"] for e in events if e["type"] == "lifecycle.stage"]
    assert stages[0] == "starting" and stages[-1] == "finished" and "validating" in stages
    assert any(e["type"] == "training.validation" and e["data"]["images"] for e in events)
    assert list((output / "validation" / "step-2").glob("*.png"))
    assert list((output / "logs").rglob("events.out.tfevents.*"))


def test_sigterm_checkpoints_exits_75_and_the_resumed_run_continues(tiny_assets, tmp_path, receiver):
    config, url = write_config(tmp_path, tiny_assets, max_train_steps=100000, checkpoint_step_interval=100000)
    process = start(config, tmp_path)
    poll_status(url, process, lambda s: s.step >= 1 and s.state == TrainerState.TRAINING)
    os.kill(process.pid, signal.SIGTERM)
    finish(process, ExitCode.INTERRUPTED)
    checkpoints = sorted((tmp_path / "output").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(checkpoints) == 1, "exactly the stop checkpoint is written"
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert stopped_at >= 1 and (checkpoints[0] / "COMPLETE").exists()

    resumed, url2 = write_config(
        tmp_path, tiny_assets, max_train_steps=stopped_at + 1, checkpoint_step_interval=100000,
        resume_from_checkpoint="latest", webhook_reporting_interval=1,
        webhook_config=[{"webhook_type": "raw", "callback_url": receiver.url}])
    process = start(resumed, tmp_path, job_id="job-1-resumed")
    finish(process, ExitCode.SUCCESS)
    steps = [r.json()["data"]["step"] for r in receiver.requests if r.json()["type"] == "training.status"]
    assert steps and set(steps) == {stopped_at + 1}  # the first step after the checkpoint, not step 1
    assert (tmp_path / "output" / "pytorch_lora_weights.safetensors").is_file()
