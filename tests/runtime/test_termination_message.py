"""The termination message: the trainer's final status, left in ``$KUBETUNER_TERMINATION_LOG`` at exit.

Unit tests of the writer and reader, the runtime's teardown in process, and real
``kubetuner-train`` subprocesses (a tiny training run, configuration errors) as the pod runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from runtime_helpers import make_cfg

from kubetuner_trainer.contract import CheckpointInfo, ExitCode, TrainerState, TrainerStatus
from kubetuner_trainer.events import StepReport
from kubetuner_trainer.runtime import build_runtime
from kubetuner_trainer.termination import (
    KUBELET_MESSAGE_LIMIT,
    TERMINATION_LOG_ENV,
    config_error_status,
    from_termination_message,
    read_termination_message,
    record_config_error,
    secret_values,
    termination_message,
    write_termination_message,
)


def cp(step: int, complete: bool = True, path: str | None = None) -> CheckpointInfo:
    return CheckpointInfo(step, path or f"/workspace/output/checkpoint-{step}", "2026-11-26T10:14:03Z", complete)


def full_status(**changes) -> TrainerStatus:
    base = TrainerStatus(state=TrainerState.TRAINING, step=400, max_steps=2000, epoch=3, max_epochs=15, percent=20.0,
                         eta_seconds=1712.4, loss=0.0831, last_losses={"loss": 0.0831, "mse": 0.0831},
                         samples_per_second=7.9, learning_rate=1e-4, checkpoints=(cp(250),), message="training",
                         job_id="team-a/sdxl-style", updated_at="2026-11-26T10:20:41Z")
    return TrainerStatus(**{**base.__dict__, **changes})


# ---------------------------------------------------------------- writer and reader


def test_round_trip_is_compact_json() -> None:
    status = full_status(checkpoints=(cp(250), cp(500, complete=False)))
    text = termination_message(status)
    assert "\n" not in text and ": " not in text and ", " not in text
    assert from_termination_message(text) == status
    assert from_termination_message(text.encode()) == status


def test_many_checkpoints_keep_the_newest_complete_ones_under_the_limit() -> None:
    # 200 checkpoints with long paths, every 7th incomplete, and a very long message.
    checkpoints = tuple(cp(s, complete=s % 7 != 0, path=f"/workspace/output/run-{'x' * 40}/checkpoint-{s}")
                        for s in range(10, 2010, 10))
    status = full_status(checkpoints=checkpoints, message="stopped: " + "detail " * 2000)
    text = termination_message(status)
    assert len(text.encode()) < KUBELET_MESSAGE_LIMIT
    parsed = from_termination_message(text)
    assert parsed is not None and parsed.step == 400 and parsed.loss == 0.0831
    kept = [c.step for c in parsed.checkpoints]
    complete = sorted(c.step for c in checkpoints if c.complete)
    assert kept == complete[-len(kept):], "the newest complete checkpoints, oldest dropped first"
    assert len(kept) >= 5 and parsed.latest_checkpoint.step == 2000
    assert all(c.complete for c in parsed.checkpoints)  # incomplete ones go before any complete one
    assert parsed.message.startswith("stopped: detail") and parsed.message.endswith("…")
    assert len(parsed.message) <= 1024


def test_newest_incomplete_checkpoint_survives_when_everything_fits() -> None:
    status = full_status(checkpoints=(cp(250), cp(500), cp(750, complete=False)))
    assert [c.step for c in from_termination_message(termination_message(status)).checkpoints] == [250, 500, 750]


@settings(max_examples=60, deadline=None)
@given(message=st.text(max_size=6000), steps=st.lists(st.integers(0, 10**9), max_size=120, unique=True),
       path_length=st.integers(1, 600), job_id=st.text(max_size=300))
def test_any_status_fits_and_parses(message: str, steps: list[int], path_length: int, job_id: str) -> None:
    status = full_status(message=message, job_id=job_id,
                         checkpoints=tuple(cp(s, complete=s % 3 != 0, path="/o/" + "p" * path_length) for s in steps))
    text = termination_message(status)
    assert len(text.encode()) < KUBELET_MESSAGE_LIMIT
    parsed = from_termination_message(text)
    assert parsed is not None and parsed.state == status.state and parsed.step == status.step
    if parsed.checkpoints:
        best = max((c.step for c in status.checkpoints if c.complete), default=None)
        assert best is None or parsed.latest_checkpoint.step == best


@pytest.mark.parametrize("garbage", [None, "", b"", "   ", "Traceback (most recent call last):\n  boom",
                                     "{\"state\": \"training\", \"step\": 4", "[1, 2]", "42", "{}",
                                     '{"state": "sleeping"}', '{"state": "training", "version": 99}',
                                     '{"state": "training", "checkpoints": [{"path": "/o"}]}',
                                     '{"state": "training", "checkpoints": 5}', '{"state": "training", "step": "x"}',
                                     b"\xff\xfe\x00"])
def test_garbage_is_no_status(garbage) -> None:
    assert from_termination_message(garbage) is None


def test_secrets_are_masked() -> None:
    environ = {"HF_TOKEN": "hf_supersecretvalue", "WANDB_API_KEY": "0123456789abcdef", "PATH": "/usr/bin:/bin",
               "SHORT_TOKEN": "abc"}
    secrets = secret_values(environ)
    assert set(secrets) == {"hf_supersecretvalue", "0123456789abcdef"}
    status = full_status(message="push to https://user:p4ssw0rd@hub.example/x failed with token hf_supersecretvalue"
                                 " (wandb 0123456789abcdef) in /usr/bin",
                         checkpoints=(cp(1, path="/o/hf_supersecretvalue/checkpoint-1"),))
    text = termination_message(status, secrets=secrets)
    for secret in ("hf_supersecretvalue", "0123456789abcdef", "p4ssw0rd", "user:"):
        assert secret not in text
    parsed = from_termination_message(text)
    assert "https://***@hub.example/x" in parsed.message and "/usr/bin" in parsed.message
    assert parsed.checkpoints[0].path == "/o/***/checkpoint-1"


def test_write_follows_the_environment(tmp_path: Path) -> None:
    status = full_status()
    assert write_termination_message(status, environ={}) is None
    target = tmp_path / "termination-log"
    env = {TERMINATION_LOG_ENV: str(target), "HF_TOKEN": "hf_secretsecret"}
    assert write_termination_message(full_status(message="hf_secretsecret"), environ=env) == target
    assert read_termination_message(environ=env).message == "***"
    # An unwritable target is logged, never raised: the exit code matters more.
    assert write_termination_message(status, tmp_path / "missing" / "log", environ={}) is None


def test_config_error_keeps_what_the_runtime_reported(tmp_path: Path) -> None:
    target = tmp_path / "termination-log"
    env = {TERMINATION_LOG_ENV: str(target), "SIMPLETUNER_JOB_ID": "team-a/run"}
    assert record_config_error("1 configuration problem:\n  - --learning_rate: must be >= 0", environ=env) == target
    fresh = read_termination_message(target)
    assert fresh.state == TrainerState.FAILED and fresh.job_id == "team-a/run"
    assert fresh.message == "configuration error: 1 configuration problem:\n  - --learning_rate: must be >= 0"
    # After a runtime reported progress and an error text, the config error keeps both.
    write_termination_message(full_status(message="adapter rejected --model_flavour"), target)
    record_config_error("", environ=env)
    merged = read_termination_message(target)
    assert merged.state == TrainerState.FAILED and merged.step == 400 and merged.checkpoints == (cp(250),)
    assert merged.message == "configuration error: adapter rejected --model_flavour"
    assert config_error_status("configuration error: x").message == "configuration error: x"


# ---------------------------------------------------------------- the runtime's teardown (in process)


def _step(step: int) -> StepReport:
    return StepReport(step=step, max_steps=10, epoch=1, max_epochs=None, loss=0.5, loss_components={},
                      learning_rates={"group0": 1e-4}, samples_per_second=2.0, seconds_per_step=0.1)


def test_runtime_exit_leaves_the_final_status(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "termination-log"
    monkeypatch.setenv(TERMINATION_LOG_ENV, str(target))
    cfg = make_cfg(tmp_path, job_id="team-a/run")
    with build_runtime(cfg, install_signals=False, bind_port=0) as rt:
        rt.step(_step(3))
        rt.checkpoint(cp(3, path=str(tmp_path / "out" / "checkpoint-3")), seconds=0.1)
        assert not target.exists()  # written at exit, not before
    final = read_termination_message(target)
    assert final.step == 3 and final.latest_checkpoint.step == 3 and final.job_id == "team-a/run"

    with pytest.raises(RuntimeError, match="disk on fire"), build_runtime(cfg, install_signals=False, bind_port=0) as rt:
        rt.step(_step(1))
        raise RuntimeError("disk on fire")
    crashed = read_termination_message(target)
    assert crashed.state == TrainerState.FAILED and "disk on fire" in crashed.message and crashed.step == 1


def test_hard_exit_leaves_the_status_first(tmp_path: Path, monkeypatch) -> None:
    """A second SIGTERM exits at once (128 + 15), yet the message is written before."""
    import signal

    import kubetuner_trainer.runtime as runtime_module

    target = tmp_path / "termination-log"
    monkeypatch.setenv(TERMINATION_LOG_ENV, str(target))
    exits: list[int] = []
    monkeypatch.setattr(runtime_module, "_hard_exit", exits.append)
    with build_runtime(make_cfg(tmp_path), install_signals=False, bind_port=0) as rt:
        rt.step(_step(7))
        rt.checkpoint(cp(5), seconds=0.1)
        rt.stop.handle(signal.SIGTERM)
        assert exits == [] and not target.exists()
        rt.stop.handle(signal.SIGTERM)
        assert exits == [128 + signal.SIGTERM]
        hard = read_termination_message(target)
        assert hard is not None and hard.step == 7 and hard.latest_checkpoint.step == 5


# ---------------------------------------------------------------- real kubetuner-train processes


def _train(tmp_path: Path, *args: str, **env: str) -> tuple[int, TrainerStatus | None, str]:
    exe = shutil.which("kubetuner-train") or str(Path(sys.executable).with_name("kubetuner-train"))
    target = tmp_path / "termination-log"
    target.write_text("")  # the kubelet creates it empty
    proc = subprocess.run([exe, *args], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**os.environ, TERMINATION_LOG_ENV: str(target), "SIMPLETUNER_JOB_ID": "team-a/x", **env})
    text = target.read_text()
    assert len(text.encode()) < KUBELET_MESSAGE_LIMIT
    return proc.returncode, from_termination_message(text), proc.stdout + proc.stderr


def test_config_error_on_the_command_line_leaves_a_failed_message(tmp_path: Path) -> None:
    code, status, output = _train(tmp_path, "--learning_rate", "-1", "--lora_rank", "many",
                                  HF_TOKEN="hf_do_not_leak_me")
    assert code == ExitCode.CONFIG_ERROR, output
    assert status is not None and status.state == TrainerState.FAILED and status.job_id == "team-a/x"
    assert status.message.startswith("configuration error: ")
    assert "lora_rank" in status.message and "learning_rate" in status.message
    assert "hf_do_not_leak_me" not in (tmp_path / "termination-log").read_text()


@pytest.mark.slow
def test_preflight_config_error_leaves_its_problems(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_family": "sd1x", "model_type": "lora", "output_dir": str(tmp_path / "o"),
                                  "pretrained_model_name_or_path": str(tmp_path / "no-such-model"),
                                  "data_backend_config": str(tmp_path / "none.json"), "max_train_steps": 1,
                                  "optimizer": "adamw_bf16", "metrics_port": 0}))
    code, status, output = _train(tmp_path, "--config", str(config))
    assert code == ExitCode.CONFIG_ERROR, output
    assert status is not None and status.state == TrainerState.FAILED
    assert "pretrained_model_name_or_path" in status.message and "no such file or folder" in status.message


@pytest.mark.slow
def test_real_run_leaves_a_message_naming_its_checkpoints(tmp_path: Path) -> None:
    from kubetuner_trainer.tiny import build_tiny_dataset, build_tiny_sd1x

    model = build_tiny_sd1x(tmp_path / "model")
    images = build_tiny_dataset(tmp_path / "images", count=2)
    backend = tmp_path / "multidatabackend.json"
    backend.write_text(json.dumps([
        {"id": "tiny", "type": "local", "instance_data_dir": str(images), "caption_strategy": "textfile",
         "resolution": 64, "resolution_type": "pixel", "cache_dir_vae": str(tmp_path / "cache" / "vae")},
        {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": True,
         "cache_dir": str(tmp_path / "cache" / "text")}]))
    output = tmp_path / "output"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "model_family": "sd1x", "model_type": "lora", "pretrained_model_name_or_path": str(model),
        "output_dir": str(output), "data_backend_config": str(backend), "optimizer": "adamw_bf16",
        "learning_rate": 1e-3, "train_batch_size": 1, "resolution": 64, "lora_rank": 2, "seed": 1,
        "max_train_steps": 2, "checkpoint_step_interval": 1, "metrics_port": 0}))
    code, status, output_text = _train(tmp_path, "--config", str(config))
    assert code == ExitCode.SUCCESS, output_text[-4000:]
    assert status is not None and status.state == TrainerState.FINISHED
    assert status.step == 2 and status.max_steps == 2 and status.loss is not None and status.job_id == "team-a/x"
    on_disk = sorted(int(p.name.split("-")[1]) for p in output.glob("checkpoint-*") if (p / "COMPLETE").exists())
    named = [c.step for c in status.checkpoints if c.complete]
    assert on_disk and named == on_disk
    assert all(Path(c.path) == output / f"checkpoint-{c.step}" for c in status.checkpoints)
