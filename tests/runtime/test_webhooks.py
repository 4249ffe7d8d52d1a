"""Webhooks: raw JSON events on a loopback receiver, Discord messages, dead endpoints, bad config."""

from __future__ import annotations

import base64
import json
from email.parser import BytesParser
from email.policy import default as email_policy

import pytest
from PIL import Image
from runtime_helpers import drive, step_report

from kubetuner_trainer.config import ConfigError
from kubetuner_trainer.contract import TrainerState
from kubetuner_trainer.runtime import build_runtime
from kubetuner_trainer.runtime.webhooks import (
    WebhookConfigError,
    WebhookDispatcher,
    error_event,
    parse_webhook_config,
)


def events_of(requests) -> list[dict]:
    return [r.json() for r in requests]


def test_raw_receiver_gets_the_event_sequence(cfg_factory, receiver, tmp_path):
    config = [{"webhook_type": "raw", "callback_url": receiver.url + "/events", "api_key": "s3cret"}]
    cfg = cfg_factory(webhook_config=json.dumps(config), webhook_reporting_interval=3600, job_id="job-42")
    image = tmp_path / "val.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(image)
    with build_runtime(cfg, install_signals=False) as rt:
        drive(rt, tmp_path / "out", steps=4, checkpoint_every=4, max_steps=4)
        rt.validation(4, [image], seconds=0.5)
        rt.error("something odd")
        rt.state(TrainerState.FINISHED, "done")
    # close() drains the queue, so everything has arrived once the block is left
    events = events_of(receiver.requests)
    kinds = [e["type"] for e in events]
    stages = [e["data"]["stage"] for e in events if e["type"] == "lifecycle.stage"]
    assert stages == ["starting", "caching", "training", "checkpointing", "training", "finished"]
    status = [e for e in events if e["type"] == "training.status"]
    # interval of an hour: the first step, the last step (forced) and the closing report
    assert [e["data"]["step"] for e in status] == [1, 4, 4]
    assert status[1]["data"]["percent"] == 100.0 and status[1]["data"]["eta_seconds"] == 0
    assert status[0]["data"]["losses"]["mse"] == pytest.approx(0.9)
    assert kinds.index("training.checkpoint") < kinds.index("training.validation") < kinds.index("training.error")
    checkpoint = next(e for e in events if e["type"] == "training.checkpoint")
    assert checkpoint["data"]["step"] == 4 and checkpoint["data"]["path"].endswith("checkpoint-4")
    validation = next(e for e in events if e["type"] == "training.validation")
    assert base64.b64decode(validation["data"]["images"][0]["base64"]) == image.read_bytes()
    assert next(e for e in events if e["type"] == "training.error")["severity"] == "error"
    assert {e["job_id"] for e in events} == {"job-42"}
    assert len({e["id"] for e in events}) == len(events)
    assert all(r.headers["x-api-key"] == "s3cret" and r.path == "/events" for r in receiver.requests)
    assert rt.webhooks.counts == {"sent": len(events), "failed": 0, "dropped": 0}


def test_dead_endpoint_never_blocks_and_drops_when_full(dead_endpoint, receiver):
    targets = parse_webhook_config([
        {"webhook_type": "raw", "callback_url": dead_endpoint, "timeout": 30, "queue_size": 4},
        {"webhook_type": "raw", "callback_url": receiver.url},
    ])
    dispatcher = WebhookDispatcher(targets, job_id=None, reporting_interval=0)
    for i in range(100):
        dispatcher.send(error_event(None, f"event {i}"))  # returns at once even though one target hangs
    receiver.wait_for(lambda reqs: len(reqs) == 100)  # the healthy target is not held up
    # the dead target holds one event in flight and four queued; the rest were dropped
    assert dispatcher.counts["dropped"] >= 95
    dispatcher.close(timeout=0.5)  # bounded even with the dead target still in flight
    assert dispatcher.counts["sent"] == 100


def test_failing_endpoint_is_counted_not_raised(receiver):
    receiver.status = 400
    dispatcher = WebhookDispatcher(parse_webhook_config({"webhook_type": "raw", "callback_url": receiver.url}),
                                   job_id=None, reporting_interval=0)
    dispatcher.send(error_event(None, "x"))
    dispatcher.close(timeout=30)
    assert dispatcher.counts == {"sent": 0, "failed": 1, "dropped": 0}


def test_discord_gets_text_and_images_as_multipart(cfg_factory, receiver, tmp_path):
    config = {"webhook_type": "discord", "webhook_url": receiver.url + "/api/webhooks/1/tok",
              "message_prefix": "[lab]", "log_level": "info"}
    image = tmp_path / "v.png"
    Image.new("RGB", (4, 4)).save(image)
    with build_runtime(cfg_factory(webhook_config=config), install_signals=False) as rt:
        rt.step(step_report(1))
        rt.validation(1, [image], seconds=0.1)
    texts, uploads = [], []
    for request in receiver.requests:
        if request.headers["content-type"] == "application/json":
            texts.append(request.json()["content"])
        else:
            message = BytesParser(policy=email_policy).parsebytes(
                b"Content-Type: " + request.headers["content-type"].encode() + b"\r\n\r\n" + request.body)
            parts = {p.get_param("name", header="content-disposition"): p for p in message.iter_parts()}
            uploads.append(parts)
    assert texts[0].startswith("[lab] trainer is starting")
    assert any(t.startswith("[lab] step 1/10") for t in texts)
    assert len(uploads) == 1
    assert json.loads(uploads[0]["payload_json"].get_content())["content"].startswith("[lab] 1 validation")
    assert uploads[0]["files[0]"].get_content() == image.read_bytes()


def test_log_level_filters_events(receiver):
    dispatcher = WebhookDispatcher(
        parse_webhook_config({"webhook_type": "raw", "callback_url": receiver.url, "log_level": "error"}),
        job_id=None, reporting_interval=0)
    from kubetuner_trainer.runtime.status import StatusTracker

    dispatcher.maybe_send_status(StatusTracker().snapshot())
    dispatcher.send(error_event(None, "bad"))
    dispatcher.close(timeout=30)
    assert [r.json()["type"] for r in receiver.requests] == ["training.error"]


def test_config_from_a_file(tmp_path):
    path = tmp_path / "hooks.json"
    path.write_text(json.dumps({"webhook_type": "raw", "callback_url": "https://x.test/h", "auth_token": "tok-9f3a"}))
    (target,) = parse_webhook_config(str(path))
    assert target.kind == "raw" and target.api_key == "tok-9f3a" and "tok-9f3a" not in repr(target)


@pytest.mark.parametrize(("config", "message"), [
    ({"webhook_type": "slack", "callback_url": "http://x"}, "webhook_type is 'slack'; allowed: raw, discord"),
    ({"webhook_type": "raw"}, "webhook_config[0].callback_url must be an http"),
    ([{"webhook_type": "raw", "callback_url": "http://x", "timeout": 600}], "timeout must be"),
    ({"webhook_type": "raw", "callback_url": "http://x", "colour": 1}, "unknown key 'colour'"),
    ("{not json", "does not parse"),
])
def test_bad_config_names_the_field(config, message):
    with pytest.raises(WebhookConfigError) as error:
        parse_webhook_config(config)
    assert message in str(error.value)


def test_bad_config_fails_runtime_start_without_leaking_the_key(cfg_factory):
    config = {"webhook_type": "raw", "callback_url": "ftp://x", "api_key": "hunter2"}
    with pytest.raises(ConfigError) as error, build_runtime(cfg_factory(webhook_config=config),
                                                            install_signals=False):
        pass
    assert "webhook_config" in str(error.value) and "hunter2" not in str(error.value)


def test_training_preflight_includes_the_runtime_checks(cfg_factory):
    from kubetuner_trainer.training.preflight import all_problems

    cfg = cfg_factory(model_family="sd1x", webhook_config={"webhook_type": "pager", "callback_url": "http://x"})
    problems = [p for p in all_problems(cfg) if p.option == "webhook_config"]
    assert len(problems) == 1 and "allowed: raw, discord" in problems[0].message


def test_api_key_can_come_from_an_environment_variable(monkeypatch):
    entry = {"webhook_type": "raw", "callback_url": "https://x.test/h", "api_key_env": "HOOK_KEY"}
    monkeypatch.setenv("HOOK_KEY", "from-secret")
    (target,) = parse_webhook_config(entry)
    assert target.api_key == "from-secret"
    monkeypatch.delenv("HOOK_KEY")
    with pytest.raises(WebhookConfigError, match="HOOK_KEY"):
        parse_webhook_config(entry)
    with pytest.raises(WebhookConfigError, match="not both"):
        parse_webhook_config({**entry, "api_key": "inline"})
