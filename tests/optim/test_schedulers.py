"""Every --lr_scheduler: learning rates at known steps against the formulas, and exact resume."""

from __future__ import annotations

import math

import pytest
import torch
from optim_helpers import make_cfg

from kubetuner_trainer.config import ConfigError
from kubetuner_trainer.optim import (
    SCHEDULERS,
    build_lr_scheduler,
    build_optimizer,
    preflight_problems,
    preflight_warnings,
)
from kubetuner_trainer.options import get_registry

LR = 1e-3
TOTAL = 100
WARMUP = 10


def _lrs(steps=TOTAL + 5, group_lrs=(LR,), **values):
    values = {"optimizer": "optimi-adamw", "learning_rate": LR, **values}
    cfg = make_cfg(**values)
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in group_lrs]
    optimizer = build_optimizer(cfg, groups)
    scheduler = build_lr_scheduler(cfg, optimizer, TOTAL)
    history = []
    for _ in range(steps):
        history.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return history


def _main(history):
    return [lrs[0] for lrs in history]


def test_every_catalog_schedule_is_implemented():
    assert set(get_registry().get("lr_scheduler").choices) == set(SCHEDULERS)


def test_constant_has_no_warmup():
    assert set(_main(_lrs(lr_scheduler="constant"))) == {LR}
    cfg = make_cfg(optimizer="optimi-adamw", lr_scheduler="constant", lr_warmup_steps=5)
    assert preflight_problems(cfg) == []
    warnings = preflight_warnings(cfg)
    assert [p.option for p in warnings] == ["lr_warmup_steps"]
    assert "constant_with_warmup" in warnings[0].message


@pytest.mark.parametrize("name", ["constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"])
def test_warmup_is_linear_from_zero(name):
    lrs = _main(_lrs(lr_scheduler=name, lr_warmup_steps=WARMUP, lr_end=1e-5))
    for t in range(WARMUP + 1):
        assert lrs[t] == pytest.approx(LR * t / WARMUP, rel=1e-12, abs=1e-15)


def test_constant_with_warmup_stays_at_peak():
    assert set(_main(_lrs(lr_scheduler="constant_with_warmup", lr_warmup_steps=WARMUP))[WARMUP:]) == {LR}


def test_linear_decays_to_zero_at_the_end():
    lrs = _main(_lrs(lr_scheduler="linear", lr_warmup_steps=WARMUP))
    assert lrs[55] == pytest.approx(LR * 0.5)
    assert lrs[TOTAL] == 0.0 and lrs[TOTAL + 3] == 0.0


def test_cosine_is_half_a_cosine():
    lrs = _main(_lrs(lr_scheduler="cosine", lr_warmup_steps=WARMUP))
    for t in (10, 25, 55, 80, 99):
        progress = (t - WARMUP) / (TOTAL - WARMUP)
        assert lrs[t] == pytest.approx(LR * 0.5 * (1 + math.cos(math.pi * progress)), rel=1e-12)
    assert lrs[55] == pytest.approx(LR / 2)
    assert lrs[TOTAL] == pytest.approx(0.0, abs=1e-18)


def test_cosine_with_restarts_restarts_each_cycle():
    lrs = _main(_lrs(lr_scheduler="cosine_with_restarts", lr_warmup_steps=WARMUP, lr_num_cycles=3))
    cycle = (TOTAL - WARMUP) / 3  # 30 steps
    assert lrs[WARMUP] == pytest.approx(LR)
    assert lrs[WARMUP + 15] == pytest.approx(LR / 2)  # middle of the first cycle
    assert lrs[WARMUP + 29] < 0.01 * LR  # end of the first cycle
    assert lrs[WARMUP + 30] == pytest.approx(LR)  # restart
    assert lrs[WARMUP + 75] == pytest.approx(LR / 2)
    progress = (47 - WARMUP) / (TOTAL - WARMUP)
    assert lrs[47] == pytest.approx(LR * 0.5 * (1 + math.cos(math.pi * ((3 * progress) % 1))), rel=1e-12)
    assert cycle == 30 and lrs[TOTAL] == 0.0


def test_polynomial_reaches_lr_end_with_power():
    lr_end, power = 1e-5, 2.0
    lrs = _main(_lrs(lr_scheduler="polynomial", lr_warmup_steps=WARMUP, lr_end=lr_end, lr_power=power))
    for t in (10, 40, 70, 99):
        remaining = 1 - (t - WARMUP) / (TOTAL - WARMUP)
        assert lrs[t] == pytest.approx((LR - lr_end) * remaining**power + lr_end, rel=1e-12)
    assert lrs[TOTAL] == pytest.approx(lr_end) and lrs[TOTAL + 4] == pytest.approx(lr_end)


def test_polynomial_second_group_ends_at_same_fraction():
    history = _lrs(group_lrs=(LR, LR / 10), lr_scheduler="polynomial", lr_end=1e-5, lr_power=1.0)
    assert history[TOTAL][0] == pytest.approx(1e-5)
    assert history[TOTAL][1] == pytest.approx(1e-6)
    assert history[50][1] == pytest.approx(history[50][0] / 10)


def test_sine_oscillates_with_warmup_period():
    lrs = _main(_lrs(lr_scheduler="sine", lr_warmup_steps=20))
    for t in (0, 5, 10, 27, 63):
        assert lrs[t] == pytest.approx(LR * (1 + math.sin(math.pi * (t % 20) / 20)) / 2, rel=1e-12)
    assert lrs[10] == pytest.approx(LR) and lrs[20] == pytest.approx(LR / 2)


def test_sine_without_warmup_spans_the_run():
    lrs = _main(_lrs(lr_scheduler="sine"))
    assert lrs[50] == pytest.approx(LR)
    assert lrs[0] == pytest.approx(LR / 2)


def test_schedule_free_optimizers_keep_a_constant_rate():
    history = _main(_lrs(optimizer="adamw_schedulefree", lr_warmup_steps=WARMUP))
    assert set(history) == {LR}  # warmup happens inside the optimizer


def test_schedule_free_with_an_explicit_decay_only_warns():
    cfg = make_cfg(optimizer="adamw_schedulefree", lr_scheduler="cosine")
    assert preflight_problems(cfg) == []
    warnings = preflight_warnings(cfg)
    assert [p.option for p in warnings] == ["lr_scheduler"]
    assert "schedule-free" in warnings[0].message
    assert preflight_warnings(make_cfg(optimizer="adamw_schedulefree", lr_scheduler="constant")) == []


def test_polynomial_lr_end_above_learning_rate_is_refused():
    cfg = make_cfg(optimizer="optimi-adamw", learning_rate=1e-6, lr_scheduler="polynomial", lr_end=1e-5)
    problems = preflight_problems(cfg)
    assert [p.option for p in problems] == ["lr_end"]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-6)
    with pytest.raises(ConfigError, match="lr_end"):
        build_lr_scheduler(cfg, optimizer, 10)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_state_dict_round_trip_gives_identical_rates(name):
    warmup = {} if name == "constant" else {"lr_warmup_steps": 7}
    cfg = make_cfg(optimizer="optimi-adamw", learning_rate=LR, lr_scheduler=name, lr_num_cycles=2, lr_end=1e-6,
                   **warmup)

    def build():
        optimizer = build_optimizer(cfg, [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": LR}])
        return optimizer, build_lr_scheduler(cfg, optimizer, 40)

    opt_a, sched_a = build()
    straight = []
    for _ in range(40):
        opt_a.step()
        sched_a.step()
        straight.append(sched_a.get_last_lr())
    opt_b, sched_b = build()
    for _ in range(17):
        opt_b.step()
        sched_b.step()
    saved = sched_b.state_dict()
    opt_c, sched_c = build()
    opt_c.load_state_dict(opt_b.state_dict())
    sched_c.load_state_dict(saved)
    resumed = []
    for _ in range(23):
        opt_c.step()
        sched_c.step()
        resumed.append(sched_c.get_last_lr())
    assert resumed == straight[17:]
    assert opt_c.param_groups[0]["lr"] == opt_a.param_groups[0]["lr"]


@pytest.mark.parametrize("name", ["linear", "cosine_with_restarts", "polynomial", "sine"])
def test_several_scheduler_steps_per_update_give_the_same_rates(name):
    """accelerate steps a prepared scheduler once per process on every optimizer step."""
    cfg = make_cfg(optimizer="optimi-adamw", learning_rate=LR, lr_scheduler=name, lr_warmup_steps=4,
                   lr_num_cycles=2, lr_end=1e-6)

    def rates(per_update):
        optimizer = build_optimizer(cfg, [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": LR}])
        scheduler = build_lr_scheduler(cfg, optimizer, 20, steps_per_update=per_update)
        seen = []
        for _ in range(22):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            for _ in range(per_update):
                scheduler.step()
        return seen

    assert rates(3) == pytest.approx(rates(1), rel=1e-12, abs=1e-15)
