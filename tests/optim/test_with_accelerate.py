"""The optimizers and schedules behind accelerate's wrappers, including save_state/load_state resume."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from optim_helpers import make_cfg, regression_data, tiny_model, train_steps

from kubetuner_trainer.optim import (
    build_lr_scheduler,
    build_optimizer,
    optimizer_eval_mode,
    optimizer_train_mode,
)


def _prepared(name, accelerator):
    cfg = make_cfg(optimizer=name, learning_rate=1e-2, lr_warmup_steps=2,
                   **({} if name.startswith("adamw_schedulefree") else {"lr_scheduler": "linear"}))
    model = tiny_model()
    optimizer = build_optimizer(cfg, [{"params": list(model.parameters()), "lr": 1e-2, "name": "unet"}])
    scheduler = build_lr_scheduler(cfg, optimizer, num_training_steps=10)
    return accelerator.prepare(model, optimizer, scheduler)


@pytest.mark.parametrize("name", ["adamw_bf16", "adamw_schedulefree", "soap"])
def test_save_state_load_state_resume_is_bitwise(tmp_path, name):
    data = regression_data()

    model_a, opt_a, sched_a = _prepared(name, Accelerator(cpu=True))
    train_steps(model_a, opt_a, data, 4, sched_a)
    optimizer_eval_mode(opt_a)
    optimizer_train_mode(opt_a)
    losses_a = train_steps(model_a, opt_a, data, 4, sched_a)

    accelerator = Accelerator(cpu=True)  # one per run: it numbers what it prepared
    model_b, opt_b, sched_b = _prepared(name, accelerator)
    train_steps(model_b, opt_b, data, 4, sched_b)
    optimizer_eval_mode(opt_b)
    accelerator.save_state(str(tmp_path / "checkpoint"))

    accelerator = Accelerator(cpu=True)
    model_c, opt_c, sched_c = _prepared(name, accelerator)
    accelerator.load_state(str(tmp_path / "checkpoint"))
    optimizer_train_mode(opt_c)
    losses_c = train_steps(model_c, opt_c, data, 4, sched_c)

    assert losses_c == losses_a
    assert sched_c.get_last_lr() == sched_a.get_last_lr()
    for a, c in zip(model_a.parameters(), model_c.parameters(), strict=True):
        assert torch.equal(a, c)
