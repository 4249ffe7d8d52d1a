"""The optimizers written here (adamw_bf16, SOAP) and the wrappers around packages
(schedule-free master weights, prodigy_steps): correctness on known problems."""

from __future__ import annotations

import io

import pytest
import torch
from optim_helpers import make_cfg, regression_data, tiny_model, train_steps

from kubetuner_trainer.optim import build_optimizer, optimizer_eval_mode, optimizer_train_mode
from kubetuner_trainer.optim.adamw_bf16 import AdamWBF16, stochastic_round_to_bf16
from kubetuner_trainer.optim.prodigy import ProdigyWithSteps
from kubetuner_trainer.optim.soap import SOAP


def _constant_gradient_run(optimizer_factory, steps, dtype=torch.bfloat16, size=20000):
    """A weight of ones with gradient 1 everywhere: Adam moves it by ~lr per step."""
    weight = torch.nn.Parameter(torch.ones(size, dtype=dtype))
    optimizer = optimizer_factory([weight])
    for _ in range(steps):
        weight.grad = torch.ones_like(weight)
        optimizer.step()
    return weight.detach().float()


def test_stochastic_rounding_is_unbiased_and_exact_on_representable_values():
    generator = torch.Generator().manual_seed(0)
    values = torch.full((100000,), 1.0 + 2**-9, dtype=torch.float32)  # 1/4 of a bf16 spacing above 1
    rounded = stochastic_round_to_bf16(values, generator).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert (rounded > 1.0).float().mean().item() == pytest.approx(0.25, abs=0.01)  # 5 sigma
    assert rounded.mean().item() == pytest.approx(1.0 + 2**-9, abs=6e-5)
    exact = torch.tensor([1.0, -2.5, 0.0, 3.140625], dtype=torch.float32)
    assert torch.equal(stochastic_round_to_bf16(exact, generator).float(), exact)
    negative = stochastic_round_to_bf16(-values, generator).float()
    assert negative.mean().item() == pytest.approx(-(1.0 + 2**-9), abs=6e-5)


def test_adamw_bf16_keeps_small_updates_that_plain_bf16_adamw_loses():
    lr, steps = 1e-3, 50  # each step is 1/8 of a bf16 spacing at 1.0
    plain = _constant_gradient_run(lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0), steps)
    assert torch.all(plain == 1.0)  # every update rounded away
    ours = _constant_gradient_run(lambda p: AdamWBF16(p, lr=lr, weight_decay=0), steps)
    assert ours.mean().item() == pytest.approx(1.0 - steps * lr, abs=2e-3)
    reference = _constant_gradient_run(lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0), steps, torch.float32)
    assert ours.mean().item() == pytest.approx(reference.mean().item(), abs=2e-3)


def test_adamw_bf16_matches_torch_adamw_on_fp32_params():
    model_a, model_b = tiny_model(), tiny_model()
    data = regression_data()
    ours = AdamWBF16(model_a.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    torch_adamw = torch.optim.AdamW(model_b.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-8,
                                    weight_decay=0.1, foreach=False)
    train_steps(model_a, ours, data, 10)
    train_steps(model_b, torch_adamw, data, 10)
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_adamw_bf16_trains_bf16_model_and_keeps_fp32_state_through_save_load():
    model = tiny_model(dtype=torch.bfloat16)
    data = regression_data()
    optimizer = build_optimizer(make_cfg(optimizer="adamw_bf16", learning_rate=1e-2),
                                [{"params": model.parameters(), "lr": 1e-2}])
    losses = train_steps(model, optimizer, data, 60)
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    restored = AdamWBF16(model.parameters(), lr=1e-2)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for param in model.parameters():
        saved, loaded = optimizer.state[param], restored.state[param]
        assert loaded["exp_avg"].dtype == torch.float32  # torch would have cast it to bf16
        assert torch.equal(saved["exp_avg_sq"], loaded["exp_avg_sq"])


def test_adamw_bf16_rounding_depends_on_seed_only():
    def run(seed):
        return _constant_gradient_run(lambda p: AdamWBF16(p, lr=1e-3, weight_decay=0, seed=seed), 5, size=4096)

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


@pytest.mark.parametrize(("variant", "moves"), [("adamw_schedulefree", True), ("adamw_schedulefree+no_kahan", False)])
def test_schedule_free_master_weights_keep_small_bf16_updates(variant, moves):
    weight = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    cfg = make_cfg(optimizer=variant, learning_rate=1e-3, adam_weight_decay=0.0)
    optimizer = build_optimizer(cfg, [{"params": [weight], "lr": 1e-3}])
    optimizer_train_mode(optimizer)
    for _ in range(60):
        weight.grad = torch.ones_like(weight)
        optimizer.step()
    optimizer_eval_mode(optimizer)
    assert weight.dtype == torch.bfloat16
    moved = (1.0 - weight.float()).mean().item()
    if moves:
        assert moved > 0.02  # the fp32 master accumulated ~60 small steps
        master = optimizer.state[weight]["fp32_master"]
        assert master.dtype == torch.float32
        assert torch.equal(weight, master.to(torch.bfloat16))
    else:
        assert moved < 0.02  # most updates rounded away in bf16


def test_schedule_free_eval_and_train_modes_swap_weights():
    model = tiny_model()
    data = regression_data()
    optimizer = build_optimizer(make_cfg(optimizer="adamw_schedulefree", learning_rate=1e-2),
                                [{"params": model.parameters(), "lr": 1e-2}])
    optimizer_train_mode(optimizer)
    train_steps(model, optimizer, data, 20)
    train_point = [p.detach().clone() for p in model.parameters()]
    optimizer_eval_mode(optimizer)
    assert any(not torch.equal(a, p) for a, p in zip(train_point, model.parameters(), strict=True))
    optimizer_train_mode(optimizer)
    for a, p in zip(train_point, model.parameters(), strict=True):
        torch.testing.assert_close(a, p, rtol=1e-5, atol=1e-6)


def test_soap_without_preconditioning_is_adam_one_step_late():
    torch.manual_seed(0)
    start = torch.randn(6, 5)
    grads = [torch.randn(6, 5) for _ in range(6)]
    soap_weight = torch.nn.Parameter(start.clone())
    adam_weight = torch.nn.Parameter(start.clone())
    soap = SOAP([soap_weight], lr=1e-2, betas=(0.9, 0.99), eps=1e-12, weight_decay=0.0, max_precond_dim=0)
    adam = torch.optim.Adam([adam_weight], lr=1e-2, betas=(0.9, 0.99), eps=1e-12)
    soap_weight.grad = grads[0]
    soap.step()  # the first SOAP step only gathers statistics
    assert torch.equal(soap_weight, start)
    for grad in grads[1:]:
        soap_weight.grad, adam_weight.grad = grad.clone(), grad.clone()
        soap.step()
        adam.step()
    torch.testing.assert_close(soap_weight, adam_weight, rtol=1e-5, atol=1e-6)


def test_soap_bases_are_orthogonal_and_follow_the_gradient_statistics():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(8, 4))
    soap = SOAP([weight], lr=1e-2, precondition_frequency=1)
    gradient = torch.randn(8, 4)
    for _ in range(40):  # fixed statistics: repeated QR power iterations converge to the eigenbasis
        weight.grad = gradient.clone()
        soap.step()
    state = soap.state[weight]
    for dim, size in enumerate(weight.shape):
        basis = state[f"Q{dim}"]
        torch.testing.assert_close(basis.T @ basis, torch.eye(size), rtol=1e-4, atol=1e-4)
    # the basis (nearly) diagonalises the averaged Gram matrix along dim 0, largest first
    rotated = state["Q0"].T @ state["GG0"] @ state["Q0"]
    off_diagonal = rotated - torch.diag(torch.diagonal(rotated))
    assert off_diagonal.norm() < 0.05 * rotated.norm()
    diagonal = torch.diagonal(rotated)
    assert diagonal[0] == diagonal.max()
    assert "Q0" in state and state["exp_avg_sq"].shape == weight.shape


def test_soap_one_dimensional_params_are_plain_adam():
    bias = torch.nn.Parameter(torch.zeros(5))
    soap = SOAP([bias], lr=1e-2)
    bias.grad = torch.ones(5)
    soap.step()
    assert not any(key.startswith("Q") for key in soap.state[bias])


def test_prodigy_steps_freezes_the_step_size_estimate():
    def d_history(limit):
        model = tiny_model()
        data = regression_data()
        optimizer = ProdigyWithSteps(model.parameters(), lr=1.0, prodigy_steps=limit)
        history = []
        for _ in range(12):
            train_steps(model, optimizer, data, 1)
            history.append(optimizer.param_groups[0]["d"])
        return history

    free, frozen = d_history(0), d_history(4)
    assert free[:4] == frozen[:4]
    assert len(set(frozen[3:])) == 1  # unchanged after step 4
    assert len(set(free[3:])) > 1  # while the unlimited run keeps adapting


def _roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", ["adamw_bf16", "adamw_schedulefree", "adamw_schedulefree+no_kahan", "soap",
                                  "optimi-adamw"])
def test_bf16_model_resumes_bitwise(name):
    """fp32 state kept for bf16 weights must survive save/load, or the resumed run drifts."""
    cfg = make_cfg(optimizer=name, learning_rate=1e-2)
    data = regression_data()

    def fresh():
        model = tiny_model(dtype=torch.bfloat16)
        return model, build_optimizer(cfg, [{"params": model.parameters(), "lr": 1e-2}])

    model_a, opt_a = fresh()
    train_steps(model_a, opt_a, data, 10)
    model_b, opt_b = fresh()
    train_steps(model_b, opt_b, data, 5)
    saved = _roundtrip({"model": model_b.state_dict(), "optimizer": opt_b.state_dict()})
    model_c, opt_c = fresh()
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["optimizer"])
    train_steps(model_c, opt_c, data, 5)
    for a, c in zip(model_a.parameters(), model_c.parameters(), strict=True):
        assert a.dtype == torch.bfloat16
        assert torch.equal(a, c)
