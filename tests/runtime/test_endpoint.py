"""The metrics/status endpoint, scraped over HTTP while a scripted loop reports events."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error

import pytest
from prometheus_client.parser import text_string_to_metric_families
from runtime_helpers import drive, http_get, step_report

from kubetuner_trainer.contract import CheckpointInfo, TrainerState, TrainerStatus
from kubetuner_trainer.runtime import build_runtime
from kubetuner_trainer.runtime.metrics import TrainerMetrics
from kubetuner_trainer.runtime.status import StatusTracker


def samples(text: str) -> dict[tuple[str, tuple], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_status_and_metrics_follow_the_loop(cfg_factory, tmp_path):
    cfg = cfg_factory(tracker_run_name="run-a")
    with build_runtime(cfg, install_signals=False, bind_port=0) as rt:
        assert rt.url is not None
        status = TrainerStatus.from_json(http_get(rt.url + "/status")[2])
        assert status.state == TrainerState.STARTING and status.step == 0

        drive(rt, tmp_path / "out", steps=4, checkpoint_every=2, max_steps=10)
        code, ctype, body = http_get(rt.url + "/status")
        assert code == 200 and ctype == "application/json"
        doc = json.loads(body)
        assert doc["version"] == 1
        status = TrainerStatus.from_dict(doc)
        assert status.state == TrainerState.TRAINING
        assert (status.step, status.max_steps, status.epoch) == (4, 10, 1)
        assert status.percent == 40.0
        assert status.eta_seconds == pytest.approx(6 * 0.5)
        assert status.loss == pytest.approx(0.25)
        assert status.last_losses == pytest.approx({"loss": 0.25, "mse": 0.225, "prior": 0.025})
        assert [c.step for c in status.checkpoints] == [2, 4]
        assert status.latest_checkpoint.path == str(tmp_path / "out" / "checkpoint-4")

        code, ctype, text = http_get(rt.url + "/metrics")
        assert code == 200 and ctype.startswith("text/plain")
        found = samples(text.decode())
        assert found[("kubetuner_trainer_step", ())] == 4
        assert found[("kubetuner_trainer_max_steps", ())] == 10
        assert found[("kubetuner_trainer_loss", (("component", "total"),))] == pytest.approx(0.25)
        assert found[("kubetuner_trainer_loss", (("component", "prior"),))] == pytest.approx(0.025)
        assert found[("kubetuner_trainer_learning_rate", (("param_group", "text_encoder"),))] == 5e-5
        assert found[("kubetuner_trainer_step_duration_seconds_count", ())] == 4
        assert found[("kubetuner_trainer_data_wait_seconds_total", ())] == pytest.approx(0.04)
        assert found[("kubetuner_trainer_last_checkpoint_step", ())] == 4
        assert found[("kubetuner_trainer_checkpoint_save_duration_seconds_count", ())] == 2
        assert found[("kubetuner_trainer_state", (("kubetuner_trainer_state", "training"),))] == 1
        assert found[("kubetuner_trainer_state", (("kubetuner_trainer_state", "caching"),))] == 0
        assert ("kubetuner_trainer_gpu_memory_allocated_bytes", ()) in found  # exported, 0 without CUDA

        rt.error("disk almost full")
        rt.validation(4, [], seconds=1.5)
        found = samples(http_get(rt.url + "/metrics")[2].decode())
        assert found[("kubetuner_trainer_errors_total", ())] == 1
        assert found[("kubetuner_trainer_validation_duration_seconds_count", ())] == 1
        assert TrainerStatus.from_json(http_get(rt.url + "/status")[2]).message == "disk almost full"

        assert http_get(rt.url + "/healthz")[2] == b"ok\n"
        with pytest.raises(urllib.error.HTTPError) as missing:
            http_get(rt.url + "/nope")
        assert missing.value.code == 404
        rt.state(TrainerState.FINISHED, "done")
        assert TrainerStatus.from_json(http_get(rt.url + "/status")[2]).state == TrainerState.FINISHED
        url = rt.url
    with pytest.raises(urllib.error.URLError):
        http_get(url + "/healthz")  # the server is gone after the block


def test_metrics_port_zero_disables_the_server(cfg_factory):
    with build_runtime(cfg_factory(metrics_port=0), install_signals=False) as rt:
        assert rt.server is None and rt.url is None


def test_a_failing_loop_reports_failed(cfg_factory):
    with pytest.raises(RuntimeError, match="boom"), build_runtime(
        cfg_factory(), install_signals=False, bind_port=0
    ) as rt:
        rt.step(step_report(1))
        raise RuntimeError("boom")
    status = rt.status.snapshot()
    assert status.state == TrainerState.FAILED and "boom" in status.message


def test_eta_follows_a_smoothed_step_time():
    now = [0.0]
    tracker = StatusTracker(clock=lambda: now[0], smoothing=0.5)
    for step, at in ((1, 1.0), (2, 3.0), (3, 4.0)):  # step times: (none), 2.0, 1.0
        now[0] = at
        tracker.step(step_report(step, max_steps=11, seconds_per_step=None))
    status = tracker.snapshot()
    # EMA: 2.0, then 2.0 + 0.5 * (1.0 - 2.0) = 1.5 s/step; 8 steps left
    assert status.eta_seconds == pytest.approx(8 * 1.5)
    assert status.percent == pytest.approx(100 * 3 / 11, abs=0.01)


def test_checkpoints_replace_same_step_and_stay_sorted():
    tracker = StatusTracker()
    tracker.checkpoint(CheckpointInfo(4, "/o/checkpoint-4", "t", complete=False))
    tracker.checkpoint(CheckpointInfo(2, "/o/checkpoint-2", "t"))
    tracker.checkpoint(CheckpointInfo(4, "/o/checkpoint-4", "t"))
    status = tracker.snapshot()
    assert [(c.step, c.complete) for c in status.checkpoints] == [(2, True), (4, True)]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
def test_exposition_passes_promtool(tmp_path):
    metrics = TrainerMetrics()
    metrics.describe_model(model_family="sd1x", model_type="lora", job_id="job-1")
    for step in range(1, 4):
        metrics.observe_step(step_report(step, gpu_memory_allocated_bytes=1 << 20, gpu_memory_peak_bytes=2 << 20))
    metrics.observe_checkpoint(CheckpointInfo(3, "/o/c", "t"), 1.0, 1.7e9)
    metrics.observe_validation(2.0, 4)
    metrics.observe_error()
    metrics.webhook_events.labels(result="dropped").inc()
    metrics.script_runs.labels(script="post_checkpoint", result="ok").inc()
    metrics.uploads.labels(target="s3", result="ok").inc()
    metrics.upload_duration.labels(target="s3").observe(3.0)
    result = subprocess.run(["promtool", "check", "metrics"], input=metrics.exposition(),
                            capture_output=True, check=False)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert result.stdout.strip() == b"" and result.stderr.strip() == b"", "promtool reported lint problems"
