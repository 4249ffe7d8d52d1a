"""--optimizer_config parsing and how option values reach the optimizer's keyword arguments."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from optim_helpers import make_any_cfg, make_cfg, tiny_model

from kubetuner_trainer.config import ConfigError
from kubetuner_trainer.optim import OPTIMIZERS, build_optimizer, parse_optimizer_config, preflight_problems
from kubetuner_trainer.optim.optimizer_config import OptimizerConfigError
from kubetuner_trainer.optim.optimizers import optimizer_kwargs


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("d_coef=0.1", {"d_coef": 0.1}),
        ("d_coef=2,use_bias_correction=true", {"d_coef": 2, "use_bias_correction": True}),
        ("betas=(0.9,0.99),eps=1e-6", {"betas": (0.9, 0.99), "eps": 1e-6}),
        (" betas = ( 0.9 , 0.99 , 0.5 ) , weight_decay = 0 ", {"betas": (0.9, 0.99, 0.5), "weight_decay": 0}),
        ("beta3=none,growth_rate=inf,safeguard_warmup=False", {"beta3": None, "growth_rate": math.inf,
                                                               "safeguard_warmup": False}),
        ("momentum=-.5,", {"momentum": -0.5}),
        ("", {}),
    ],
)
def test_parse_good(text, expected):
    assert parse_optimizer_config(text) == expected


def test_parse_keeps_types_apart():
    parsed = parse_optimizer_config("a=1,b=1.0,c=true,d=word")
    assert [type(v) for v in parsed.values()] == [int, float, bool, str]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("d_coef", "has no '='"),
        ("betas=(0.9,0.99", "unbalanced"),
        ("betas=0.9)", "unbalanced"),
        ("d_coef=0.1,d_coef=0.2", "twice"),
        ("1abc=3", "not a valid key"),
        ("eps=", "empty value"),
    ],
)
def test_parse_bad(text, fragment):
    with pytest.raises(OptimizerConfigError, match=fragment):
        parse_optimizer_config(text)


def test_unknown_key_lists_allowed_keys():
    cfg = make_cfg(optimizer="prodigy", optimizer_config="d_coeff=0.1")
    with pytest.raises(OptimizerConfigError) as raised:
        optimizer_kwargs(cfg, OPTIMIZERS["prodigy"])
    message = str(raised.value)
    assert "'d_coeff'" in message and "'prodigy'" in message
    assert "d_coef" in message and "safeguard_warmup" in message


@pytest.mark.parametrize(
    ("optimizer", "text", "fragment"),
    [
        ("prodigy", "d_coef=fast", "not a number"),
        ("prodigy", "safeguard_warmup=1", "expected a boolean"),
        ("prodigy", "betas=(0.9,0.99,0.5)", "tuple of 2"),
        ("prodigy", "d_coef=true", "expected a number"),
        ("adamw_bf16", "lr=0.1", "not accepted"),  # the rate comes from --learning_rate
        ("adamw_schedulefree", "master_weights=false", "not accepted"),  # fixed by the variant
        ("soap", "precondition_frequency=2.5", "expected an integer"),
    ],
)
def test_bad_values_are_config_problems(optimizer, text, fragment):
    cfg = make_cfg(optimizer=optimizer, optimizer_config=text)
    problems = preflight_problems(cfg)
    assert [p.option for p in problems] == ["optimizer_config"]
    assert fragment in problems[0].message
    with pytest.raises(ConfigError, match="optimizer_config"):
        build_optimizer(cfg, [{"params": tiny_model().parameters(), "lr": 1e-3}])


def test_config_values_reach_the_optimizer():
    cfg = make_cfg(optimizer="prodigy", learning_rate=1.0, optimizer_config="d_coef=0.5,betas=(0.8,0.9),beta3=0.7")
    optimizer = build_optimizer(cfg, [{"params": tiny_model().parameters(), "lr": 1.0}])
    group = optimizer.param_groups[0]
    assert (group["d_coef"], group["betas"], group["beta3"]) == (0.5, (0.8, 0.9), 0.7)


def test_adam_options_map_onto_adam_family():
    cfg = make_cfg(optimizer="optimi-adamw", adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-7,
                   adam_weight_decay=0.05)
    kwargs = optimizer_kwargs(cfg, OPTIMIZERS["optimi-adamw"])
    assert (kwargs["betas"], kwargs["eps"], kwargs["weight_decay"]) == ((0.8, 0.95), 1e-7, 0.05)


def test_unset_adam_options_train_like_simpletuner():
    """SimpleTuner's own settings per optimizer (its optimizer table) apply while --adam_* are unset."""
    kwargs = optimizer_kwargs(make_cfg(optimizer="optimi-adamw"), OPTIMIZERS["optimi-adamw"])
    assert (kwargs["betas"], kwargs["eps"], kwargs["weight_decay"]) == ((0.9, 0.99), 1e-6, 0.0)
    kwargs = optimizer_kwargs(make_cfg(optimizer="adamw_bf16"), OPTIMIZERS["adamw_bf16"])
    assert (kwargs["betas"], kwargs["eps"], kwargs["weight_decay"]) == ((0.9, 0.999), 1e-6, 1e-2)
    kwargs = optimizer_kwargs(make_cfg(optimizer="adamw_bf16", adam_epsilon=1e-8), OPTIMIZERS["adamw_bf16"])
    assert kwargs["eps"] == 1e-8


def test_optimizer_betas_override_everywhere_but_adam_options_skip_lion_and_adan():
    lion = optimizer_kwargs(make_cfg(optimizer="optimi-lion", adam_beta1=0.5), OPTIMIZERS["optimi-lion"])
    assert "betas" not in lion  # Lion is not Adam: --adam_beta* leave the class's own betas
    assert "eps" not in lion and "weight_decay" not in lion
    lion = optimizer_kwargs(make_cfg(optimizer="optimi-lion", optimizer_beta2=0.98), OPTIMIZERS["optimi-lion"])
    assert lion["betas"] == (0.9, 0.98)
    adan = optimizer_kwargs(make_cfg(optimizer="optimi-adan", optimizer_beta1=0.9), OPTIMIZERS["optimi-adan"])
    assert adan["betas"] == (0.9, 0.92, 0.99)


def test_variant_presets_yield_to_explicit_options():
    spec = OPTIMIZERS["adamw_schedulefree+aggressive"]
    kwargs = optimizer_kwargs(make_cfg(optimizer=spec.name), spec)
    assert (kwargs["weight_decay"], kwargs["eps"], kwargs["master_weights"]) == (1e-3, 1e-6, True)
    kwargs = optimizer_kwargs(make_cfg(optimizer=spec.name, adam_weight_decay=0.2), spec)
    assert (kwargs["weight_decay"], kwargs["eps"]) == (0.2, 1e-6)
    plain = optimizer_kwargs(make_cfg(optimizer="adamw_schedulefree"), OPTIMIZERS["adamw_schedulefree"])
    assert (plain["weight_decay"], plain["eps"]) == (1e-2, 1e-8)
    no_kahan = optimizer_kwargs(make_cfg(optimizer="adamw_schedulefree+no_kahan"),
                                OPTIMIZERS["adamw_schedulefree+no_kahan"])
    assert no_kahan["master_weights"] is False


def test_soap_uses_its_own_betas_unless_adam_betas_are_given():
    assert optimizer_kwargs(make_cfg(optimizer="soap"), OPTIMIZERS["soap"])["betas"] == (0.95, 0.95)
    cfg = make_cfg(optimizer="soap", adam_beta1=0.9, adam_beta2=0.99)
    assert optimizer_kwargs(cfg, OPTIMIZERS["soap"])["betas"] == (0.9, 0.99)


def test_schedule_free_warmup_and_prodigy_steps_come_from_options():
    cfg = make_cfg(optimizer="adamw_schedulefree", lr_warmup_steps=7)
    assert optimizer_kwargs(cfg, OPTIMIZERS["adamw_schedulefree"])["warmup_steps"] == 7
    cfg = make_cfg(optimizer="prodigy", prodigy_steps=11)
    assert optimizer_kwargs(cfg, OPTIMIZERS["prodigy"])["prodigy_steps"] == 11


@pytest.mark.parametrize(("scale_sqrt", "factor"), [(False, 2 * 3 * 4), (True, math.sqrt(24))])
def test_lr_scale_multiplies_group_rates_by_effective_batch(scale_sqrt, factor):
    values = {"optimizer": "optimi-adamw", "lr_scale": True, "train_batch_size": 2,
              "gradient_accumulation_steps": 3, "num_processes": 4}
    if scale_sqrt:
        values["lr_scale_sqrt"] = True
    cfg = make_any_cfg(**values)  # batch options belong to the training loop's area
    model = tiny_model()
    optimizer = build_optimizer(cfg, [
        {"params": list(model[0].parameters()), "lr": 1e-4, "name": "unet"},
        {"params": list(model[2].parameters()), "lr": 1e-5, "name": "text_encoder"},
    ])
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-4 * factor, 1e-5 * factor])
    assert [g["name"] for g in optimizer.param_groups] == ["unet", "text_encoder"]


def test_without_lr_scale_rates_are_kept():
    optimizer = build_optimizer(make_any_cfg(optimizer="optimi-adamw", train_batch_size=8),
                                [{"params": tiny_model().parameters(), "lr": 3e-4}])
    assert optimizer.param_groups[0]["lr"] == 3e-4


@pytest.mark.parametrize(("dtype", "expected"), [(torch.bfloat16, True), (torch.float32, False)])
def test_torchao_rounds_stochastically_for_bf16_weights(dtype, expected):
    spec = OPTIMIZERS["ao-adamw8bit"]
    assert optimizer_kwargs(make_cfg(optimizer=spec.name), spec, [dtype])["bf16_stochastic_round"] is expected
    forced = make_cfg(optimizer=spec.name, optimizer_config="bf16_stochastic_round=false")
    assert optimizer_kwargs(forced, spec, [torch.bfloat16])["bf16_stochastic_round"] is False


def test_whole_numbers_for_integer_keywords_become_ints():
    cfg = make_cfg(optimizer="soap", optimizer_config="precondition_frequency=4.0,max_precond_dim=64")
    kwargs = optimizer_kwargs(cfg, OPTIMIZERS["soap"])
    assert (kwargs["precondition_frequency"], kwargs["max_precond_dim"]) == (4, 64)
    assert isinstance(kwargs["precondition_frequency"], int)


def test_unset_optimizer_is_simpletuners_default_adamw_bf16():
    optimizer = build_optimizer(make_cfg(), [{"params": tiny_model().parameters(), "lr": 1e-3}])
    assert type(optimizer).__name__ == "AdamWBF16"


_numbers = st.one_of(
    st.integers(-10**6, 10**6),
    st.floats(allow_nan=False, allow_infinity=False, width=64).filter(lambda x: abs(x) < 1e300),
)
_values = st.one_of(st.booleans(), st.none(), _numbers, st.tuples(_numbers, _numbers), st.tuples(_numbers))


def _format(value):
    if isinstance(value, tuple):
        return "(" + ",".join(repr(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return repr(value)


@given(st.dictionaries(st.from_regex(r"[a-z_][a-z0-9_]{0,12}", fullmatch=True), _values, max_size=6))
@settings(max_examples=200, deadline=None)
def test_formatted_configs_parse_back_to_the_same_values(entries):
    text = ",".join(f"{key}={_format(value)}" for key, value in entries.items())
    parsed = parse_optimizer_config(text)
    assert parsed == entries
    assert [type(v) for v in parsed.values()] == [type(v) for v in entries.values()]
