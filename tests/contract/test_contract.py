"""The trainer/operator status contract and the argv placeholder rules."""

from __future__ import annotations

import json

import pytest

from kubetuner_trainer.contract import CONTRACT_VERSION, CheckpointInfo, ExitCode, TrainerState, TrainerStatus
from kubetuner_trainer.placeholders import placeholders_in, substitute_argv


def test_status_round_trip_and_latest_checkpoint():
    status = TrainerStatus(
        state=TrainerState.TRAINING,
        step=20,
        max_steps=100,
        loss=0.25,
        checkpoints=(
            CheckpointInfo(10, "/out/checkpoint-10", "2026-01-01T00:00:00Z"),
            CheckpointInfo(20, "/out/checkpoint-20", "2026-01-01T00:01:00Z", complete=False),
        ),
    )
    again = TrainerStatus.from_json(status.to_json())
    assert again == status
    assert again.latest_checkpoint.step == 10
    assert json.loads(status.to_json())["state"] == "training"


def test_status_ignores_unknown_fields_and_refuses_newer_versions():
    doc = TrainerStatus(step=3).to_dict() | {"future_field": 1}
    assert TrainerStatus.from_dict(doc).step == 3
    with pytest.raises(ValueError, match="newer"):
        TrainerStatus.from_dict(doc | {"version": CONTRACT_VERSION + 1})


def test_exit_codes_are_distinct_and_described():
    assert len({int(c) for c in ExitCode}) == len(ExitCode)
    assert "not retried" in ExitCode.describe(78)
    assert "resumed" in ExitCode.describe(75)
    assert "137" in ExitCode.describe(137)


def test_substitution_happens_after_splitting():
    argv = substitute_argv(
        "/opt/hook.sh --path {local_checkpoint_path} --step={global_step} {unknown}",
        {"local_checkpoint_path": "/out/my run; rm -rf /", "global_step": 42},
    )
    assert argv == ["/opt/hook.sh", "--path", "/out/my run; rm -rf /", "--step=42", "{unknown}"]


def test_list_commands_are_taken_as_argv_and_none_is_empty():
    assert substitute_argv(["echo", "{a} and {b}"], {"a": "x y", "b": None}) == ["echo", "x y and "]
    assert placeholders_in(["x", "{a}-{b}", "{c"]) == {"a", "b"}


@pytest.mark.parametrize("document", ["[1,2,3]", '"x"', '{"step": "abc"}', '{"step": true}', '{"state": "zzz"}',
                                      '{"checkpoints": [{"step": "x", "path": "/p"}]}', '{"checkpoints": [{}]}',
                                      '{"checkpoints": {}}', '{"last_losses": {"mse": "low"}}', '{"loss": "0.1"}'])
def test_status_documents_off_the_contract_are_refused_with_value_error(document: str) -> None:
    with pytest.raises(ValueError):
        TrainerStatus.from_json(document)


def test_status_numbers_are_json_numbers() -> None:
    parsed = TrainerStatus.from_json('{"state": "training", "step": 3, "loss": 1, "max_steps": null}')
    assert parsed.loss == 1.0 and isinstance(parsed.loss, float) and parsed.max_steps is None
