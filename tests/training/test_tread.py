"""TREAD token routing (--tread_config) on tiny real models: routed LoRA steps per family kind, exact
re-insertion, no effect outside training, gradient checkpointing, exact resume and config errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from training_helpers import InMemoryData, assert_lora_resume_is_exact, fixed_flow_loss, train_in_process

from kubetuner_trainer.config import ConfigError
from kubetuner_trainer.contract import ExitCode
from kubetuner_trainer.models import load_family
from kubetuner_trainer.training.preflight import check
from kubetuner_trainer.training.tread import (
    Route,
    TokenRouter,
    TreadConfigError,
    parse_tread_config,
    resolve_routes,
    routable_families,
)

ALL_BLOCKS = {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 0, "end_layer_idx": -1}]}
FAST = {"flux": {"tokenizer_max_length": 16}}


def _inputs(family):
    """A fixed batch of two for ``family.predict`` (noisy latents, timesteps on the objective's scale, text)."""
    gen = torch.Generator().manual_seed(0)
    channels = family.denoiser.config.in_channels
    if family.family == "flux":
        channels //= 4  # packed 2x2
    shape = (2, channels, 2, 8, 8) if family.is_video else (2, channels, 8, 8)
    return torch.randn(shape, generator=gen), torch.tensor([300.0, 700.0]), family.encode_text(["a red cat", "a dog"])


def _router(family, config=ALL_BLOCKS, seed=0):
    return TokenRouter(family, family.denoiser, parse_tread_config(config),
                       torch.Generator().manual_seed(seed)).install()


# ----- routed training, per family kind ----------------------------------------------------------------
# flux: two block lists, text beside the image tokens (rotary rows cut); wan: video tokens with rotary
# embeddings (the families of SimpleTuner's TREAD examples)
@pytest.mark.parametrize("family", ["flux", "wan"])
def test_a_routed_lora_trains_and_its_loss_falls_on_an_overfit_batch(make_cfg, family):
    from accelerate import Accelerator

    from kubetuner_trainer.training.loop import TrainingLoop

    cfg = make_cfg(family, tread_config=ALL_BLOCKS, max_train_steps=12, lora_rank=8, learning_rate=2e-2,
                   lr_scheduler="constant", **FAST.get(family, {}))
    loaded = load_family(cfg)
    data = InMemoryData(loaded.encoders(), count=2, batch_size=2)
    if loaded.is_video:
        data.latents = data.latents.expand(-1, -1, 2, -1, -1).clone()  # 2-frame clips
    before = fixed_flow_loss(loaded, data)
    loop = TrainingLoop(cfg, Accelerator(cpu=True), loaded, data, seed=7)
    result = loop.run()
    assert result.exit_code == ExitCode.SUCCESS and all(np.isfinite(result.losses))
    assert loop.token_router is not None and loop.token_router.routes == [Route(0.5, 0, 1)]
    after = fixed_flow_loss(loaded, data)
    assert after < before * 0.9, (before, after)


# sd3: joint blocks; auraflow: a route from joint into single blocks, where text leads the image tokens;
# pixart_sigma: DiT blocks (DDPM); cosmos2image: rotary embeddings, EDM objective
@pytest.mark.parametrize("family", ["sd3", "auraflow", "pixart_sigma", "cosmos2image"])
def test_a_routed_lora_step_trains_the_other_routable_families(make_cfg, family):
    result, loaded, _ = train_in_process(make_cfg(family, tread_config=ALL_BLOCKS, max_train_steps=2,
                                                  learning_rate=1e-2),
                                         data_factory=lambda enc: InMemoryData(enc, count=2, batch_size=2))
    assert result.exit_code == ExitCode.SUCCESS and all(np.isfinite(result.losses))
    assert result.losses[1] != result.losses[0]


# ----- the router --------------------------------------------------------------------------------------
def test_tokens_not_selected_come_back_unchanged_at_their_positions(make_cfg):
    family = load_family(make_cfg("flux", **FAST["flux"]))
    first, last = family.transformer_blocks()
    seen: dict[str, torch.Tensor] = {}

    def record(name, value):
        seen[name] = value

    first.register_forward_pre_hook(lambda m, a, k: record("in", k["hidden_states"]), with_kwargs=True)
    router = _router(family)
    first.register_forward_pre_hook(lambda m, a, k: record("routed", k["hidden_states"]), with_kwargs=True)
    last.register_forward_hook(lambda m, a, out: record("out", out[1]))
    family.denoiser.train()
    latents, steps, text = _inputs(family)
    family.predict(family.denoiser, latents, steps, text, None)
    keep = router.state.keep[0]
    tokens = seen["in"].shape[1]
    assert keep.numel() == tokens // 2 and torch.equal(keep, keep.sort().values)
    assert torch.equal(seen["routed"], seen["in"][:, keep])  # the blocks see the kept tokens, in order
    dropped = torch.ones(tokens, dtype=torch.bool)
    dropped[keep] = False
    assert torch.equal(seen["out"][:, dropped], seen["in"][:, dropped])
    assert not torch.allclose(seen["out"][:, keep], seen["in"][:, keep])  # the kept ones went through the blocks


def test_routing_is_off_outside_training_and_after_removal(make_cfg):
    family = load_family(make_cfg("wan"))
    latents, steps, text = _inputs(family)
    denoiser = family.denoiser

    def run(train: bool, grad: bool) -> torch.Tensor:
        denoiser.train(train)
        with torch.set_grad_enabled(grad):
            return family.predict(denoiser, latents, steps, text, None).detach()

    plain = {(t, g): run(t, g) for t in (False, True) for g in (False, True)}
    router = _router(family)
    assert torch.equal(run(False, True), plain[False, True])  # validation/eval mode
    assert torch.equal(run(True, False), plain[True, False])  # no gradients (evaluation loss)
    assert not torch.allclose(run(True, True), plain[True, True])  # a training pass is routed
    router.remove()
    assert torch.equal(run(True, True), plain[True, True])


def test_per_token_modulation_is_cut_with_the_tokens(make_cfg):
    """Per-frame timesteps (Wan 2.2 ti2v) reach Wan's blocks as per-token modulation ``[B, S, 6, D]``."""
    family = load_family(make_cfg("wan"))
    latents, _, text = _inputs(family)
    seen = []
    _router(family)  # its hooks run first: the recording hook sees what the block gets
    block = family.transformer_blocks()[1]
    block.register_forward_pre_hook(lambda m, a, k: seen.append((k["hidden_states"].shape[1], k["temb"].shape[1],
                                                                  k["rotary_emb"][0].shape[1])), with_kwargs=True)
    family.denoiser.train()
    out = family.predict(family.denoiser, latents, torch.tensor([[0.0, 500.0], [0.0, 800.0]]), text, None)
    tokens = latents.shape[2] * (latents.shape[3] // 2) * (latents.shape[4] // 2)
    assert seen == [(tokens // 2, tokens // 2, tokens // 2)] and torch.isfinite(out).all()


def test_gradient_checkpointing_recomputes_the_same_route(make_cfg):
    grads = []
    for checkpointing in (False, True):
        family = load_family(make_cfg("flux", **FAST["flux"]))
        denoiser = family.denoiser.train()
        if checkpointing:
            family.enable_gradient_checkpointing(denoiser)
        for p in denoiser.parameters():
            p.requires_grad_(True)
        _router(family, seed=3)
        latents, steps, text = _inputs(family)
        family.predict(denoiser, latents, steps, text, None).square().mean().backward()
        grads.append([p.grad.clone() for p in denoiser.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))


def test_a_compiled_routed_model_draws_new_tokens_each_pass_like_the_eager_one(make_cfg):
    """Regional torch.compile traces the routing hooks (graph breaks at the draw): same outputs and gradients
    (aot_eager, whole model too, was checked by hand: the same)."""
    passes = []
    for compiled in (False, True):
        family = load_family(make_cfg("sd3"))
        denoiser = family.denoiser.train()
        denoiser.requires_grad_(True)
        _router(family, seed=5)
        if compiled:  # installed first, as the loop does
            for block in family.transformer_blocks():
                block.compile(backend="eager")
        latents, steps, text = _inputs(family)
        runs = []
        for _ in range(2):
            out = family.predict(denoiser, latents, steps, text, None)
            out.square().mean().backward()
            runs.append([out.detach()] + [p.grad.clone() for p in denoiser.parameters()])
            denoiser.zero_grad()
        passes.append(runs)
    assert not torch.equal(passes[0][0][0], passes[0][1][0])  # a new draw each pass
    assert all(torch.allclose(a, b, atol=1e-5) for ours, theirs in zip(*passes, strict=True)
               for a, b in zip(ours, theirs, strict=True))


def test_resume_with_routing_is_exact(make_cfg, tmp_path):
    assert_lora_resume_is_exact(lambda **o: make_cfg("flux", tread_config=ALL_BLOCKS, **FAST["flux"], **o), tmp_path,
                                data_factory=lambda enc: InMemoryData(enc, count=4, batch_size=2))


# ----- configuration -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("config", "says"), [
    ({"routes": [{"selection_ratio": 1.0, "start_layer_idx": 0, "end_layer_idx": 1}]}, "selection_ratio"),
    ({"routes": [{"selection_ratio": 0, "start_layer_idx": 0, "end_layer_idx": 1}]}, "greater than 0"),
    ({"routes": [{"selection_ratio": 0.5, "start_layer_idx": 0}]}, "lacks end_layer_idx"),
    ({"routes": [{"selection_ratio": 0.5, "start_layer_idx": 0, "end_layer_idx": 1, "ratio": 1}]}, "unknown keys"),
    ({"routes": [{"selection_ratio": 0.5, "start_layer_idx": 1.5, "end_layer_idx": 2}]}, "start_layer_idx"),
    ({"routes": [{"selection_ratio": 0.5, "start_layer_idx": 3, "end_layer_idx": 2}]}, "after end_layer_idx"),
    ({"routes": []}, "non-empty list"),
    ({"route": []}, "allowed: routes"),
    ("[1, 2]", "JSON object"),
])
def test_malformed_configs_name_the_field(config, says):
    with pytest.raises(TreadConfigError, match=says):
        parse_tread_config(config)


def test_routes_are_checked_against_the_depth_of_the_model():
    routes = parse_tread_config('{"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2},'
                                ' {"selection_ratio": 0.25, "start_layer_idx": 0, "end_layer_idx": 1}]}')
    assert resolve_routes(routes, 19) == [Route(0.25, 0, 1), Route(0.5, 2, 17)]  # forward order
    with pytest.raises(TreadConfigError, match="has 3 transformer blocks, so allowed: -3 to 2"):
        resolve_routes([Route(0.5, 0, 3)], 3)
    with pytest.raises(TreadConfigError, match="overlap"):
        resolve_routes([Route(0.5, 0, 2), Route(0.5, -2, -1)], 4)
    with pytest.raises(TreadConfigError, match="starts at block 3 after it ends at block 1"):
        resolve_routes([Route(0.5, -1, 1)], 4)


def test_config_errors_are_refused_before_and_after_loading(make_cfg):
    assert {"flux", "wan", "sd3", "auraflow", "pixart_sigma", "cosmos2image"} <= set(routable_families())
    with pytest.raises(ConfigError) as info:
        check(make_cfg("sd1x", tread_config=ALL_BLOCKS))
    (problem,) = info.value.problems
    assert problem.option == "tread_config" and "model_family sd1x" in problem.message
    assert "flux" in problem.message and "wan" in problem.message
    with pytest.raises(ConfigError, match="selection_ratio"):
        check(make_cfg("flux", tread_config='{"routes": [{"selection_ratio": 2, "start_layer_idx": 0, '
                                            '"end_layer_idx": 1}]}'))
    check(make_cfg("flux", tread_config=ALL_BLOCKS))
    too_deep = {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 0, "end_layer_idx": 5}]}
    with pytest.raises(ConfigError, match="tread_config.*the model has 2 transformer blocks"):
        train_in_process(make_cfg("sd3", tread_config=too_deep, max_train_steps=1))
