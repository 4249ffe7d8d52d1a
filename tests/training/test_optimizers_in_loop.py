"""Every ``--optimizer`` and ``--lr_scheduler`` either trains through the loop or is refused at config time."""

from __future__ import annotations

import pytest
import torch
from training_helpers import RecordingEvents, train_in_process

from kubetuner_trainer import optim
from kubetuner_trainer.config import ConfigError
from kubetuner_trainer.contract import ExitCode
from kubetuner_trainer.training.preflight import check


def _config_or_refusal(make_cfg, **overrides):
    try:
        cfg = make_cfg(**overrides)
        check(cfg)
    except ConfigError as exc:
        return None, exc
    return cfg, None


@pytest.mark.parametrize("name", list(optim.OPTIMIZERS))
def test_optimizer_trains_a_step_or_is_refused(make_cfg, name):
    cfg, refusal = _config_or_refusal(make_cfg, optimizer=name, max_train_steps=2)
    if refusal is not None:
        assert any(p.option in ("optimizer", "optimizer_config") for p in refusal.problems), refusal
        assert str(refusal).strip()
        return
    events = RecordingEvents()
    result, adapter, _ = train_in_process(cfg, events=events)
    assert result.exit_code == ExitCode.SUCCESS
    assert [r.step for r in events.steps] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r.loss)) for r in events.steps)
    lora = [p for n, p in adapter.denoiser.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora)  # lora_B starts at zero: the optimizer moved it


@pytest.mark.parametrize("name", list(optim.SCHEDULERS))
def test_lr_scheduler_drives_the_reported_learning_rate(make_cfg, name):
    events = RecordingEvents()
    warmup = {} if name == "constant" else {"lr_warmup_steps": 1}  # constant refuses a warmup
    cfg = make_cfg(lr_scheduler=name, max_train_steps=4, **warmup)
    result, _, _ = train_in_process(cfg, events=events)
    assert result.exit_code == ExitCode.SUCCESS
    lrs = [r.learning_rates["unet"] for r in events.steps]
    assert len(lrs) == 4 and all(lr >= 0 for lr in lrs)
    assert max(lrs) <= cfg.learning_rate * 1.0001
