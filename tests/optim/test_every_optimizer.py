"""Every --optimizer choice of the catalog either trains here or is refused with a reason."""

from __future__ import annotations

import io

import pytest
import torch
from optim_helpers import (
    EXTRA_CONFIG,
    LEARNING_RATES,
    implemented_optimizers,
    loss_of,
    make_any_cfg,
    make_cfg,
    optimizer_choices,
    regression_data,
    tiny_model,
    train_steps,
)

from kubetuner_trainer.config import ConfigError
from kubetuner_trainer.optim import (
    OPTIMIZERS,
    build_lr_scheduler,
    build_optimizer,
    optimizer_eval_mode,
    optimizer_train_mode,
    preflight_problems,
)

CHOICES = optimizer_choices()
SLOW = {name for name in CHOICES if name.startswith("ao-")}  # torch.compile on first step


def _params(name):
    marks = [pytest.mark.slow] if name in SLOW else []
    return pytest.param(name, marks=marks, id=name)


def _cfg(name, **extra):
    values = {"optimizer": name, "learning_rate": LEARNING_RATES.get(name, 1e-2), "lr_scheduler": "constant"}
    if name in EXTRA_CONFIG:
        values["optimizer_config"] = EXTRA_CONFIG[name]
    if OPTIMIZERS.get(name) and OPTIMIZERS[name].schedule_free:
        values.pop("lr_scheduler")
    values.update(extra)
    return values


def test_table_covers_every_catalog_choice():
    assert set(CHOICES) <= set(OPTIMIZERS), sorted(set(CHOICES) - set(OPTIMIZERS))


@pytest.mark.parametrize("name", [_params(n) for n in CHOICES])
def test_optimizer_trains_or_is_refused_with_reason(name):
    problems = preflight_problems(make_any_cfg(**_cfg(name)))
    if problems:
        # implemented optimizers are refused only for the device they need (CUDA), which this machine lacks
        if name in implemented_optimizers():
            assert OPTIMIZERS[name].needs_cuda and not torch.cuda.is_available(), (
                f"{name} is marked implemented but refused: {problems}")
            assert [p.message for p in problems] == ["needs a CUDA device; this machine has none"]
        for problem in problems:
            assert problem.option in ("optimizer", "optimizer_config")
            assert len(problem.message) > 20
        with pytest.raises(ConfigError) as raised:
            build_optimizer(make_any_cfg(**_cfg(name)), [{"params": tiny_model().parameters(), "lr": 1e-3}])
        assert name in str(raised.value)
        return
    assert name in implemented_optimizers(), f"{name} trains here but is not listed in implemented/optim.txt"
    cfg = make_cfg(**_cfg(name))  # the real registry accepts it
    model = tiny_model()
    data = regression_data()
    optimizer = build_optimizer(cfg, [{"params": list(model.parameters()), "lr": cfg.learning_rate, "name": "unet"}])
    assert optimizer.param_groups[0]["name"] == "unet"
    optimizer_train_mode(optimizer)
    start = loss_of(model, data).item()
    train_steps(model, optimizer, data, steps=80)
    optimizer_eval_mode(optimizer)
    end = loss_of(model, data).item()
    assert end < 0.5 * start, f"{name}: loss {start:.4f} -> {end:.4f}"


def _save_load(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # what a checkpoint loader should use


RUNS_HERE = sorted(n for n in implemented_optimizers() if torch.cuda.is_available() or not OPTIMIZERS[n].needs_cuda)


@pytest.mark.parametrize("name", [_params(n) for n in RUNS_HERE])
def test_resume_from_state_dict_continues_bitwise(name):
    """Train 2N steps straight vs N, save optimizer+scheduler state, rebuild, load, N more.

    As a training loop does around a checkpoint, both runs switch schedule-free optimizers to
    eval mode (the weights worth saving) and back to train mode at step N.
    """
    values = _cfg(name, lr_warmup_steps=3)
    if "lr_scheduler" in values:
        values["lr_scheduler"] = "cosine"
    cfg = make_cfg(**values)
    data = regression_data()

    def fresh():
        model = tiny_model()
        optimizer = build_optimizer(cfg, [{"params": list(model.parameters()), "lr": cfg.learning_rate}])
        scheduler = build_lr_scheduler(cfg, optimizer, num_training_steps=12)
        optimizer_train_mode(optimizer)
        return model, optimizer, scheduler

    model_a, opt_a, sched_a = fresh()
    train_steps(model_a, opt_a, data, 6, sched_a)
    optimizer_eval_mode(opt_a)
    optimizer_train_mode(opt_a)
    train_steps(model_a, opt_a, data, 6, sched_a)

    model_b, opt_b, sched_b = fresh()
    train_steps(model_b, opt_b, data, 6, sched_b)
    optimizer_eval_mode(opt_b)
    saved = _save_load({
        "model": model_b.state_dict(), "optimizer": opt_b.state_dict(), "scheduler": sched_b.state_dict(),
    })
    model_c, opt_c, sched_c = fresh()
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["optimizer"])
    sched_c.load_state_dict(saved["scheduler"])
    optimizer_train_mode(opt_c)
    train_steps(model_c, opt_c, data, 6, sched_c)

    assert sched_c.get_last_lr() == sched_a.get_last_lr()
    for (key, a), c in zip(model_a.state_dict().items(), model_c.state_dict().values(), strict=True):
        assert torch.equal(a, c), f"{name}: {key} differs after resume"
