"""preflight_problems: optimizers that cannot run here, and option combinations that cannot work."""

from __future__ import annotations

import pytest
from optim_helpers import make_any_cfg, make_cfg

from kubetuner_trainer.optim import OPTIMIZERS, preflight_problems, preflight_warnings
from kubetuner_trainer.optim import preflight as preflight_module

BNB = sorted(name for name in OPTIMIZERS if name.startswith("bnb-"))


def _messages(cfg):
    return {(p.option, p.message) for p in preflight_problems(cfg)}


def test_good_config_has_no_problems():
    cfg = make_cfg(optimizer="adamw_bf16", lr_scheduler="polynomial", learning_rate=1e-4, lr_end=1e-6,
                   use_ema=True, ema_decay=0.999, ema_device="cpu", ema_cpu_only=True)
    assert preflight_problems(cfg) == []


@pytest.mark.parametrize("name", BNB)
def test_bitsandbytes_is_refused_without_cuda(monkeypatch, name):
    monkeypatch.setattr(preflight_module, "cuda_available", lambda: False)
    messages = [p.message for p in preflight_problems(make_any_cfg(optimizer=name))]
    assert "needs a CUDA device; this machine has none" in messages
    problem = preflight_problems(make_any_cfg(optimizer=name))[0]
    assert problem.option == "optimizer" and problem.value == name
    assert name in str(problem)


def test_bitsandbytes_missing_package_is_named_even_with_cuda(monkeypatch):
    monkeypatch.setattr(preflight_module, "cuda_available", lambda: True)
    monkeypatch.setattr(preflight_module.importlib.util, "find_spec",
                        lambda module: None if module == "bitsandbytes" else object())
    messages = [p.message for p in preflight_problems(make_any_cfg(optimizer="bnb-adamw8bit"))]
    assert messages == ["needs the Python package 'bitsandbytes', which is not installed in this trainer image"]


def test_sdnq_optimizer_config_takes_its_group_keys_and_refuses_others():
    assert preflight_problems(make_cfg(optimizer="sdnq-adamw", optimizer_config="use_quantized_buffers=false")) == []
    assert preflight_problems(make_cfg(optimizer="sdnq-muon", optimizer_config="muon_use_quantized_matmul=true")) == []
    (problem,) = preflight_problems(make_cfg(optimizer="sdnq-lion", optimizer_config="momentum=0.9"))
    assert problem.option == "optimizer_config" and "use_quantized_buffers" in problem.message


def test_torchao_on_cpu_needs_a_compiler(monkeypatch):
    monkeypatch.setattr(preflight_module, "cuda_available", lambda: False)
    monkeypatch.setattr(preflight_module, "cxx_compiler", lambda: None)
    problems = preflight_problems(make_cfg(optimizer="ao-adamw8bit"))
    assert len(problems) == 1 and "C++ compiler" in problems[0].message
    monkeypatch.setattr(preflight_module, "cuda_available", lambda: True)
    assert preflight_problems(make_cfg(optimizer="ao-adamw8bit")) == []


def test_missing_optional_package_is_named(monkeypatch):
    monkeypatch.setattr(preflight_module.importlib.util, "find_spec",
                        lambda module: None if module == "prodigyopt" else object())
    problems = preflight_problems(make_cfg(optimizer="prodigy"))
    assert [(p.option, p.value) for p in problems] == [("optimizer", "prodigy")]
    assert "'prodigyopt'" in problems[0].message


def _warned(cfg):
    return {(p.option, p.message) for p in preflight_warnings(cfg)}


def test_prodigy_steps_without_prodigy_only_warns():
    cfg = make_cfg(optimizer="optimi-adamw", prodigy_steps=10)
    assert preflight_problems(cfg) == []
    assert _warned(cfg) == {("prodigy_steps", "has no effect: it only applies to --optimizer=prodigy")}
    assert preflight_warnings(make_cfg(optimizer="prodigy", learning_rate=1.0, prodigy_steps=10)) == []


def test_lr_scale_sqrt_without_lr_scale_only_warns():
    cfg = make_cfg(optimizer="optimi-adamw", lr_scale_sqrt=True)
    assert preflight_problems(cfg) == []
    assert [p.option for p in preflight_warnings(cfg)] == ["lr_scale_sqrt"]
    assert preflight_warnings(make_cfg(optimizer="optimi-adamw", lr_scale=True, lr_scale_sqrt=True)) == []


def test_warmup_with_constant_schedule_only_warns_unless_schedule_free():
    cfg = make_cfg(optimizer="optimi-adamw", lr_scheduler="constant", lr_warmup_steps=10)
    assert preflight_problems(cfg) == []
    assert [p.option for p in preflight_warnings(cfg)] == ["lr_warmup_steps"]
    schedule_free = make_cfg(optimizer="adamw_schedulefree", lr_scheduler="constant", lr_warmup_steps=10)
    assert preflight_warnings(schedule_free) == []


def test_ema_options_without_ema_only_warn():
    cfg = make_cfg(optimizer="optimi-adamw", ema_decay=0.99, ema_update_interval=2, ema_device="accelerator")
    assert preflight_problems(cfg) == []
    assert sorted(p.option for p in preflight_warnings(cfg)) == ["ema_decay", "ema_device", "ema_update_interval"]
    assert all("without --use_ema" in p.message for p in preflight_warnings(cfg))


def test_all_problems_are_reported_together():
    cfg = make_cfg(optimizer="adamw_schedulefree", lr_scheduler="linear", optimizer_config="bogus=1",
                   lr_scale_sqrt=True, ema_decay=1.0)
    options = sorted(p.option for p in preflight_problems(cfg))
    assert options == ["ema_decay", "optimizer_config"]
    assert sorted(p.option for p in preflight_warnings(cfg)) == ["ema_decay", "lr_scale_sqrt", "lr_scheduler"]


def test_broken_install_is_a_problem_not_a_crash(monkeypatch):
    spec = OPTIMIZERS["soap"]

    def broken(self):
        raise ImportError("libfoo.so: cannot open shared object file")

    monkeypatch.setattr(type(spec), "load", broken)
    problems = preflight_problems(make_cfg(optimizer="soap"))
    assert [p.option for p in problems] == ["optimizer"]
    assert "cannot be imported" in problems[0].message and "libfoo" in problems[0].message


def test_cpu_offload_settings_only_warn_as_simpletuner_ignores_them_without_an_offloaded_optimizer():
    cfg = make_cfg(optimizer="adamw_bf16", optimizer_offload_gradients=True, fuse_optimizer=True)
    assert preflight_problems(cfg) == []
    warned = {p.option: p.message for p in preflight_warnings(cfg)}
    assert set(warned) >= {"optimizer_offload_gradients", "fuse_optimizer"}
    assert "optimizer_cpu_offload_method" in warned["fuse_optimizer"]
    assert not {"optimizer_offload_gradients", "fuse_optimizer"} & {p.option for p in preflight_warnings(
        make_cfg(optimizer="adamw_bf16"))}
