"""EMAModel: decay math, update interval, placement, foreach, exact state round trip, store/restore."""

from __future__ import annotations

import io

import pytest
import torch
from optim_helpers import make_cfg, regression_data, tiny_model, train_steps

from kubetuner_trainer.optim import EMAModel, build_optimizer, preflight_problems, preflight_warnings


def _params(*values):
    return [torch.nn.Parameter(torch.tensor(v, dtype=torch.float32)) for v in values]


def test_decay_math_on_known_tensors():
    params = _params([0.0, 10.0], [4.0])
    ema = EMAModel(params, make_cfg(use_ema=True, ema_decay=0.9))
    with torch.no_grad():
        params[0].copy_(torch.tensor([1.0, 0.0]))
        params[1].copy_(torch.tensor([2.0]))
    assert ema.step(params) is True
    torch.testing.assert_close(ema.shadow_params[0], torch.tensor([0.1, 9.0]))
    torch.testing.assert_close(ema.shadow_params[1], torch.tensor([3.8]))
    ema.step(params)  # 0.9 * 0.1 + 0.1 * 1
    torch.testing.assert_close(ema.shadow_params[0], torch.tensor([0.19, 8.1]))


def test_unset_decay_means_0_995():
    params = _params([0.0])
    ema = EMAModel(params, make_cfg())
    with torch.no_grad():
        params[0].fill_(1.0)
    ema.step(params)
    assert ema.shadow_params[0].item() == pytest.approx(0.005)


def test_update_interval_updates_every_nth_step():
    params = _params([0.0])
    ema = EMAModel(params, make_cfg(use_ema=True, ema_decay=0.5, ema_update_interval=3))
    with torch.no_grad():
        params[0].fill_(8.0)
    updated = [ema.step(params) for _ in range(7)]
    assert updated == [False, False, True, False, False, True, False]
    assert ema.shadow_params[0].item() == pytest.approx(6.0)  # 0 -> 4 -> 6
    assert (ema.optimization_step, ema.num_updates) == (7, 2)


def test_foreach_and_per_tensor_updates_agree_bitwise():
    model = tiny_model()
    params = list(model.parameters())
    fast = EMAModel(params, make_cfg(use_ema=True, ema_decay=0.97))
    slow = EMAModel(params, make_cfg(use_ema=True, ema_decay=0.97, ema_foreach_disable=True))
    assert (fast.foreach, slow.foreach) == (True, False)
    optimizer = torch.optim.SGD(params, lr=0.1)
    data = regression_data()
    for _ in range(5):
        train_steps(model, optimizer, data, 1)
        fast.step(params)
        slow.step(params)
    for a, b in zip(fast.shadow_params, slow.shadow_params, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("device", "cpu_only"), [("cpu", False), ("cpu", True), ("accelerator", False)])
def test_shadow_placement(device, cpu_only):
    params = list(tiny_model().parameters())
    values = {"use_ema": True, "ema_device": device}
    if cpu_only:
        values["ema_cpu_only"] = True
    ema = EMAModel(params, make_cfg(**values))
    expected = torch.device("cpu") if device == "cpu" else params[0].device
    assert all(s.device == expected for s in ema.shadow_params)
    ema.step(params)
    assert all(s.device == expected for s in ema.shadow_params)


def test_cpu_only_with_accelerator_device_only_warns():
    cfg = make_cfg(use_ema=True, ema_device="accelerator", ema_cpu_only=True)
    assert preflight_problems(cfg) == []
    assert [p.option for p in preflight_warnings(cfg)] == ["ema_cpu_only"]


def test_ema_options_without_use_ema_only_warn():
    cfg = make_cfg(ema_decay=0.99, ema_update_interval=5)
    assert preflight_problems(cfg) == []
    warnings = preflight_warnings(cfg)
    assert sorted(p.option for p in warnings) == ["ema_decay", "ema_update_interval"]
    assert all("--use_ema" in p.message for p in warnings)


def test_decay_of_one_or_more_is_refused():
    assert [p.option for p in preflight_problems(make_cfg(use_ema=True, ema_decay=1.0))] == ["ema_decay"]
    with pytest.raises(ValueError, match="ema_decay"):
        EMAModel(_params([0.0]), decay=1.5)


def test_bf16_weights_get_fp32_shadows_that_keep_small_moves():
    param = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    ema = EMAModel([param], decay=0.999, update_interval=1, device="cpu", cpu_only=False, foreach=True)
    with torch.no_grad():
        param.fill_(2.0)
    for _ in range(10):
        ema.step([param])
    assert ema.shadow_params[0].dtype == torch.float32
    expected = 2.0 - 0.999**10  # in bf16 every one of these moves would round away
    assert ema.shadow_params[0][0].item() == pytest.approx(expected, rel=1e-6)


def test_state_round_trip_continues_bitwise():
    model = tiny_model()
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.05)
    data = regression_data()
    cfg = make_cfg(use_ema=True, ema_decay=0.9, ema_update_interval=2)
    ema = EMAModel(params, cfg)
    for _ in range(5):
        train_steps(model, optimizer, data, 1)
        ema.step(params)
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    resumed = EMAModel(list(tiny_model(seed=9).parameters()), cfg)  # different start, overwritten by the load
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.optimization_step == 5
    for _ in range(5):
        train_steps(model, optimizer, data, 1)
        ema.step(params)
        resumed.step(params)
    for a, b in zip(ema.shadow_params, resumed.shadow_params, strict=True):
        assert torch.equal(a, b)


def test_load_refuses_mismatched_state():
    ema = EMAModel(_params([0.0, 1.0]), decay=0.9)
    other = EMAModel(_params([0.0, 1.0], [2.0]), decay=0.9)
    with pytest.raises(ValueError, match=r"holds 1 tensor\(s\) but this model tracks 2"):
        other.load_state_dict(ema.state_dict())
    wrong_shape = EMAModel(_params([0.0, 1.0, 2.0]), decay=0.9)
    with pytest.raises(ValueError, match="shape"):
        wrong_shape.load_state_dict(ema.state_dict())


def test_store_copy_restore_for_ema_validation():
    model = tiny_model()
    params = list(model.parameters())
    ema = EMAModel(params, decay=0.5)
    optimizer = build_optimizer(make_cfg(optimizer="optimi-adamw", learning_rate=1e-2), [{"params": params, "lr": 1e-2}])
    data = regression_data()
    for _ in range(3):
        train_steps(model, optimizer, data, 1)
        ema.step(params)
    trained = [p.detach().clone() for p in params]
    with ema.applied(params):
        for p, shadow in zip(params, ema.shadow_params, strict=True):
            assert torch.equal(p, shadow)
        assert any(not torch.equal(p, t) for p, t in zip(params, trained, strict=True))
    for p, t in zip(params, trained, strict=True):
        assert torch.equal(p, t)
    with pytest.raises(RuntimeError, match="without a matching store"):
        ema.restore(params)
