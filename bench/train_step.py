"""Training-step benchmark: kubetuner's loop vs a plain diffusers-example-style loop, side by side.

Measures samples/s, peak memory, time waiting for data and model-FLOPs utilisation (FLOPs of one
training step counted with ``torch.utils.flop_counter.FlopCounterMode``) for a family and an
architecture size, at a resolution and batch size. Both loops run in this process on the same
denoiser weights and the same synthetic batches (random latents and text embeddings of the family's
shapes), so the ratio isolates the loop's own overhead. The reference is a diffusers-example-style
loop: ε-MSE on a UNet, or for Flux the rectified-flow loop of diffusers' Flux LoRA example
(logit-normal sigmas, packed latents, velocity target); SD3 and Wan (video: ``--frames`` pixel frames per
synthetic clip, ``[B, C, 1 + (frames−1)/4, h, w]`` latents) the same recipe on unpacked latents.

    python bench/train_step.py --family sdxl --arch tiny --resolution 64 --batch 1,2 --steps 8
    python bench/train_step.py --family flux --arch tiny --resolution 64 --batch 1,2 --steps 8
    python bench/train_step.py --family wan --arch tiny --resolution 64 --frames 17 --batch 1,2 --steps 8
    python bench/train_step.py --family sdxl --arch sdxl --resolution 1024 --batch 1,max --dtype bf16 \
        --gradient-checkpointing          # CUDA; "max" doubles the batch until it runs out of memory
    python bench/train_step.py --family flux --arch flux --resolution 1024 --batch 1,max --dtype bf16 \
        --gradient-checkpointing          # CUDA: the FLUX.1-dev transformer layout (12B, random weights)
    python bench/train_step.py --family sd3 --arch sd3-medium --resolution 1024 --batch 1,max --dtype bf16 \
        --gradient-checkpointing          # CUDA: the SD 3.5 Medium (or sd3-large) transformer layout
    python bench/train_step.py --family wan --arch wan-1.3b --resolution 480 --frames 33 --batch 1,max \
        --dtype bf16 --gradient-checkpointing   # CUDA: the Wan 2.1 T2V 1.3B transformer layout, video clips
    python bench/train_step.py --family flux --arch flux --resolution 1024 --batch 1 --dtype bf16 \
        --gradient-checkpointing --blocks-to-swap 20   # or --group-offload block_level: our loop offloads,
                                                       # the reference keeps every weight resident
    python bench/train_step.py --family flux --arch flux --resolution 1024 --batch 1,max --dtype bf16 \
        --gradient-checkpointing --base-precision int8-quanto   # or fp8-torchao: a quantized frozen base

Peak memory is CUDA ``max_memory_allocated`` on GPUs and the process's peak resident set (sampled)
on CPU (where subnormal floats are flushed to zero for both loops). MFU divides achieved FLOP/s by ``--peak-tflops`` (default: the GPU's dense bf16 peak from
a small table, or a matmul measured here on CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kubetuner_trainer.config import TrainerConfig
from kubetuner_trainer.data.batch import Batch
from kubetuner_trainer.events import NullEvents
from kubetuner_trainer.models import implemented_families
from kubetuner_trainer.models.quantization import PRESETS, device_problem, quantize_module
from kubetuner_trainer.options.catalog import QUANTIZATION_CHOICES

GPU_PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0,
                        "RTX 4090": 165.0}


# ----- model and data -------------------------------------------------------------------------------

def build_family(family: str, arch: str, workdir: Path, dtype: torch.dtype, device: torch.device,
                 cfg: TrainerConfig):
    """The model family around a random-weight denoiser of the requested size (tiny encoders/VAE)."""
    from kubetuner_trainer.models import family_class
    from kubetuner_trainer.models.loading import load_components

    cls = family_class(family)
    cls.build_tiny(workdir / f"tiny-{family}")
    comps = load_components(cls, cfg, weight_dtype=dtype)
    if arch != "tiny":
        torch.manual_seed(0)
        comps.denoiser = real_size_denoiser(arch).to(dtype)
        comps.denoiser.requires_grad_(False)
    model = cls(cfg, comps, device=device, weight_dtype=dtype)
    model.to(device)
    return model


#: ``--arch`` value -> the family whose real-size denoiser layout it is (``tiny`` fits every family)
REAL_SIZE_ARCHES = {"sdxl": "sdxl", "flux": "flux", "sd3-medium": "sd3", "sd3-large": "sd3", "wan-1.3b": "wan"}
#: the Wan 2.1 T2V 1.3B transformer (its hub config)
WAN_1_3B_TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                            out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def real_size_denoiser(arch: str) -> torch.nn.Module:
    """The real SDXL UNet, FLUX.1-dev or SD 3.5 Medium/Large transformer layout with random weights
    (tiny text side for Flux; SD3 keeps its real 4096/2048 conditioning widths, fed synthetically)."""
    from diffusers import (
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        UNet2DConditionModel,
        WanTransformer3DModel,
    )

    from kubetuner_trainer.models.tiny import (
        tiny_flux_transformer_config,
        tiny_sd3_transformer_config,
        tiny_unet_config,
    )

    if arch == "wan-1.3b":
        return WanTransformer3DModel(**WAN_1_3B_TRANSFORMER)
    if arch.startswith("sd3-"):
        return SD3Transformer2DModel(**tiny_sd3_transformer_config(arch.removeprefix("sd3-")))
    if arch == "flux":
        config = tiny_flux_transformer_config("flux")
        config.update(joint_attention_dim=32, pooled_projection_dim=32)  # the tiny T5/CLIP feed it
        return FluxTransformer2DModel(**config)
    return UNet2DConditionModel(**tiny_unet_config(size="sdxl"))


def text_shapes(model, text_tokens: int) -> dict[str, tuple[int, ...]]:
    if model.family == "flux":
        cfg = model.denoiser.config
        return {"prompt_embeds": (text_tokens, cfg.joint_attention_dim),
                "pooled_prompt_embeds": (cfg.pooled_projection_dim,), "attention_mask": (text_tokens,)}
    if model.family == "sd3":
        cfg = model.denoiser.config
        return {"prompt_embeds": (77 + text_tokens, cfg.joint_attention_dim),
                "pooled_prompt_embeds": (cfg.pooled_projection_dim,)}
    if model.family == "wan":
        return {"prompt_embeds": (text_tokens, model.denoiser.config.text_dim), "attention_mask": (text_tokens,)}
    unet_cfg = model.denoiser.config
    shapes = {"prompt_embeds": (77 if model.family != "kolors" else 256,
                                unet_cfg.encoder_hid_dim or unet_cfg.cross_attention_dim)}
    if unet_cfg.addition_embed_type == "text_time":
        pooled = unet_cfg.projection_class_embeddings_input_dim - 6 * unet_cfg.addition_time_embed_dim
        shapes["pooled_prompt_embeds"] = (pooled,)
    return shapes


def latent_shape(model, side: int, frames: int) -> tuple[int, ...]:
    """One sample's latent shape: ``[C, h, w]`` (RGB for a pixel-space family, ``uses_vae`` False), or
    ``[C, f, h, w]`` for Wan (``frames`` pixel frames through the family's frame rule and the VAE's 4× temporal
    compression)."""
    if model.family == "wan":
        latent_frames = 1 + (model.video_frame_count(frames) - 1) // model.vae.config.scale_factor_temporal
        return model.denoiser.config.out_channels, latent_frames, side, side
    return (model.vae.config.latent_channels if model.uses_vae else 3), side, side


class SyntheticData:
    """Endless random batches of one bucket; counts the time the consumer waits for each batch."""

    def __init__(self, model, batch_size: int, resolution: int, text_tokens: int = 512, pool: int = 4,
                 frames: int = 1):
        gen = torch.Generator().manual_seed(0)
        side = resolution // model.latent_downscale
        shapes = text_shapes(model, text_tokens)
        self.batches = []
        for _ in range(pool):
            self.batches.append(Batch(
                latents=torch.randn(batch_size, *latent_shape(model, side, frames), generator=gen),
                text={k: torch.randn(batch_size, *s, generator=gen) if k != "attention_mask"
                      else torch.ones(batch_size, *s, dtype=torch.long) for k, s in shapes.items()},
                original_sizes=[(resolution, resolution)] * batch_size, crop_coords=[(0, 0)] * batch_size,
                target_sizes=[(resolution, resolution)] * batch_size, captions=[""] * batch_size,
                paths=[""] * batch_size, dataset_ids=["bench"] * batch_size, is_regularisation=[False] * batch_size,
            ))
        self.steps_per_epoch = 10**9
        self.data_wait_seconds = 0.0
        self.position = 0

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]

    def __iter__(self):
        while True:
            started = time.perf_counter()
            batch = self.batches[self.position % len(self.batches)]
            batch = copy.copy(batch)
            batch.epoch, batch.position = 0, self.position
            self.position += 1
            self.data_wait_seconds += time.perf_counter() - started
            yield batch


# ----- measuring ------------------------------------------------------------------------------------

class PeakMemory:
    """CUDA peak allocation, or the peak resident set size of this process sampled every 5 ms."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            import psutil

            proc = psutil.Process()

            def sample():
                while not self._stop.is_set():
                    self.peak = max(self.peak, proc.memory_info().rss)
                    time.sleep(0.005)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()


@dataclass
class Measurement:
    name: str
    step_seconds: list[float]
    data_wait: float
    peak_bytes: int
    flops_per_step: float

    def median(self) -> float:
        return statistics.median(self.step_seconds)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimingEvents(NullEvents):
    def __init__(self, device):
        self.device = device
        self.times: list[float] = []
        self._last = None

    def step(self, report):
        _sync(self.device)
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def bench_kubetuner(cfg, model, data, steps: int, warmup: int) -> Measurement:
    """Our TrainingLoop, timed between consecutive optimizer steps."""
    from accelerate import Accelerator

    from kubetuner_trainer.training.loop import TrainingLoop

    accelerator = Accelerator(mixed_precision=cfg.mixed_precision or "no", cpu=model.device.type == "cpu")
    events = TimingEvents(model.device)
    loop = TrainingLoop(cfg.replace(max_train_steps=steps + warmup), accelerator, model, data, events, seed=0)
    loop.save_final = lambda: None  # the benchmark keeps no model
    with PeakMemory(model.device) as mem:
        loop.run()
    flops = count_flops(lambda: _kubetuner_step(loop, data))
    return Measurement("kubetuner", events.times[warmup - 1:], data.data_wait_seconds, mem.peak, flops)


def _kubetuner_step(loop, data):
    batch = next(iter(data))
    loss = loop.compute_loss(batch)
    loop.acc.backward(loss)
    loop.optimizer.zero_grad(set_to_none=True)


def unet_reference_loss(model, unet, batch, autocast):
    """diffusers' text-to-image example: uniform integer timesteps, add_noise, MSE on ε."""
    device = model.device
    scheduler = model.noise_scheduler
    latents = batch.latents.to(device)
    noise = torch.randn_like(latents)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
    noisy = scheduler.add_noise(latents, noise, t)
    enc = batch.text["prompt_embeds"].to(device)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        side = latents.shape[-1] * model.latent_downscale
        ids = torch.tensor([[side, side, 0, 0, side, side]] * latents.shape[0], device=device, dtype=latents.dtype)
        kwargs["added_cond_kwargs"] = {"text_embeds": batch.text["pooled_prompt_embeds"].to(device), "time_ids": ids}
    with autocast():
        pred = unet(noisy, t, encoder_hidden_states=enc, **kwargs).sample
    if pred.shape[1] == 2 * latents.shape[1]:  # a learned variance next to ε (DeepFloyd IF): diffusers' IF example
        pred = pred.chunk(2, dim=1)[0]        # trains the ε half
    return torch.nn.functional.mse_loss(pred.float(), noise.float())


def flux_reference_loss(model, transformer, batch, autocast):
    """diffusers' Flux LoRA example: logit-normal sigmas, packed latents, guidance 1, velocity target."""
    from diffusers import FluxPipeline

    device = model.device
    latents = batch.latents.to(device)
    b, c, h, w = latents.shape
    noise = torch.randn_like(latents)
    sigmas = torch.sigmoid(torch.randn(b, device=device)).view(b, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, latents.dtype)
    enc = batch.text["prompt_embeds"].to(device)
    txt_ids = torch.zeros(enc.shape[1], 3, device=device, dtype=latents.dtype)
    guidance = torch.ones(b, device=device) if transformer.config.guidance_embeds else None
    with autocast():
        pred = transformer(hidden_states=packed, timestep=sigmas.flatten(), guidance=guidance,
                           pooled_projections=batch.text["pooled_prompt_embeds"].to(device),
                           encoder_hidden_states=enc, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
    pred = FluxPipeline._unpack_latents(pred, h * model.latent_downscale, w * model.latent_downscale,
                                        model.latent_downscale)
    return torch.nn.functional.mse_loss(pred.float(), (noise - latents).float())


def sd3_reference_loss(model, transformer, batch, autocast):
    """diffusers' SD3 LoRA example: logit-normal sigmas, timesteps 1000·σ, velocity target."""
    device = model.device
    latents = batch.latents.to(device)
    noise = torch.randn_like(latents)
    sigmas = torch.sigmoid(torch.randn(latents.shape[0], device=device)).view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    with autocast():
        pred = transformer(hidden_states=noisy, timestep=sigmas.flatten() * 1000.0,
                           encoder_hidden_states=batch.text["prompt_embeds"].to(device),
                           pooled_projections=batch.text["pooled_prompt_embeds"].to(device), return_dict=False)[0]
    return torch.nn.functional.mse_loss(pred.float(), (noise - latents).float())


def wan_reference_loss(model, transformer, batch, autocast):
    """The SD3/Flux examples' rectified-flow recipe on Wan video latents: logit-normal sigmas, timesteps 1000·σ,
    velocity target."""
    device = model.device
    latents = batch.latents.to(device)
    noise = torch.randn_like(latents)
    sigmas = torch.sigmoid(torch.randn(latents.shape[0], device=device)).view(-1, 1, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    with autocast():
        pred = transformer(hidden_states=noisy, timestep=sigmas.flatten() * 1000.0,
                           encoder_hidden_states=batch.text["prompt_embeds"].to(device), return_dict=False)[0]
    return torch.nn.functional.mse_loss(pred.float(), (noise - latents).float())


def bench_reference(model, base_denoiser, data, steps: int, warmup: int, *, rank: int, lr: float,
                    autocast_dtype: torch.dtype | None, gradient_checkpointing: bool) -> Measurement:
    """A plain loop as in diffusers' example training scripts: PEFT LoRA on attention, AdamW."""
    from peft import LoraConfig

    device = model.device
    unet = base_denoiser
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=list(model.lora_targets(model.cfg))))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    times: list[float] = []
    loss_fn = {"flux": flux_reference_loss, "sd3": sd3_reference_loss, "wan": wan_reference_loss}.get(
        model.family, unet_reference_loss)

    def autocast():
        return torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()

    def one_step(batch):
        loss = loss_fn(model, unet, batch, autocast)
        loss.backward()
        return loss

    batches = iter(data)
    with PeakMemory(device) as mem:
        last = None
        for _ in range(steps + warmup):
            one_step(next(batches))
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            now = time.perf_counter()
            if last is not None:
                times.append(now - last)
            last = now
    flops = count_flops(lambda: (one_step(next(batches)), optimizer.zero_grad(set_to_none=True)))
    return Measurement("reference", times[warmup - 1:], 0.0, mem.peak, flops)


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def peak_tflops(device: torch.device, override: float | None) -> tuple[float, str]:
    if override:
        return override, "given"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16_TFLOPS.items():
            if key in name:
                return value, f"{name} dense bf16"
        return float("nan"), f"{name} (unknown peak; pass --peak-tflops)"
    a = torch.randn(1024, 1024)
    b = torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    started = time.perf_counter()
    reps = 20
    for _ in range(reps):
        a @ b
    seconds = time.perf_counter() - started
    return 2 * 1024**3 * reps / seconds / 1e12, "fp32 matmul measured on this CPU"


# ----- driver ---------------------------------------------------------------------------------------

def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _merge(parts: list[Measurement]) -> Measurement:
    return Measurement(parts[0].name, [t for m in parts for t in m.step_seconds],
                       sum(m.data_wait for m in parts), max(m.peak_bytes for m in parts), parts[0].flops_per_step)


def bench_config(args, workdir: Path) -> TrainerConfig:
    mp = {"bf16": "bf16", "fp16": "fp16"}.get(args.dtype, "no")
    return TrainerConfig.from_mapping({
        "model_family": args.family, "model_type": "lora", "pretrained_model_name_or_path": str(workdir / f"tiny-{args.family}"),
        "output_dir": str(workdir / "out"), "optimizer": args.optimizer, "learning_rate": 1e-4, "lora_rank": args.rank,
        "mixed_precision": mp, "max_train_steps": args.steps, "seed": 0, "lr_scheduler": "constant",
        "max_grad_norm": 1.0, "grad_clip_method": "norm", "gradient_checkpointing": args.gradient_checkpointing,
        "base_model_precision": args.base_precision, **offload_options(args),
    }, require=False)


def offload_options(args) -> dict:
    """The trainer options of ``--blocks-to-swap`` / ``--group-offload`` / ``--attention`` / ``--fuse-qkv`` /
    ``--attention-slice`` / ``--release-gradients`` (our loop only)."""
    options: dict = {}
    if args.blocks_to_swap:
        options["musubi_blocks_to_swap"] = args.blocks_to_swap
    if args.group_offload != "none":
        options.update(enable_group_offload=True, group_offload_type=args.group_offload,
                       group_offload_blocks_per_group=args.group_offload_blocks)
    if args.attention:
        options["attention_mechanism"] = args.attention
    if args.fuse_qkv:
        options["fuse_qkv_projections"] = True
    if args.attention_slice:
        options["unet_attention_slice"] = True
    if args.release_gradients:  # the hooks step in the backward pass: no clipping to time
        options.update(optimizer_release_gradients=True, max_grad_norm=0.0)
    return options


def fresh_denoiser(model, pristine: torch.nn.Module, cfg: TrainerConfig,
                   device: torch.device | None = None) -> torch.nn.Module:
    """A copy of the untouched denoiser (moved to ``device`` when given), quantized as ``--base-precision``
    asks (quantized tensors cannot be deep-copied, so each loop quantizes its own copy)."""
    copied = copy.deepcopy(pristine)
    if device is not None:
        copied = copied.to(device)
    preset = PRESETS.get(cfg.base_model_precision)
    if preset is None:
        return copied
    return quantize_module(copied, preset, exclude=type(model).quantization_exclude)


def run_case(args, batch_size: int, cfg: TrainerConfig, model, device: torch.device,
             dtype: torch.dtype) -> list[Measurement]:
    """Alternate our loop and the reference ``--repeats`` times on copies of one UNet; pool the timings."""
    pristine = model.denoiser
    ours, ref = [], []
    try:
        for _ in range(args.repeats):
            model.components.denoiser = fresh_denoiser(model, pristine, cfg)
            data = SyntheticData(model, batch_size, args.resolution, args.text_tokens, frames=args.frames)
            ours.append(bench_kubetuner(cfg, model, data, args.steps, args.warmup))
            # the reference keeps every weight resident
            model.components.denoiser = fresh_denoiser(model, pristine, cfg, device)
            _free(device)
            data = SyntheticData(model, batch_size, args.resolution, args.text_tokens, frames=args.frames)
            ref.append(bench_reference(model, model.denoiser, data,
                                       args.steps, args.warmup, rank=args.rank, lr=1e-4,
                                       autocast_dtype=dtype if dtype != torch.float32 else None,
                                       gradient_checkpointing=args.gradient_checkpointing))
            model.components.denoiser = pristine
            _free(device)
    finally:
        model.components.denoiser = pristine  # the next batch size starts from the untouched UNet
        _free(device)
    return [_merge(ours), _merge(ref)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sdxl", choices=implemented_families())
    parser.add_argument("--arch", default="tiny", choices=("tiny", *REAL_SIZE_ARCHES),
                        help="tiny test denoiser, or the real SDXL UNet (sdxl family) / FLUX.1-dev (flux) / "
                             "SD 3.5 Medium or Large (sd3) / Wan 2.1 T2V 1.3B (wan) transformer layout with "
                             "random weights")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--text-tokens", type=int, default=512,
                        help="Flux: T5 sequence length of the synthetic prompts (FLUX.1-dev trains with 512)")
    parser.add_argument("--frames", type=int, default=17, help="video families (wan): pixel frames per synthetic clip")
    parser.add_argument("--batch", default="1", help="comma-separated batch sizes; 'max' searches the largest")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="alternate the two loops this many times")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--optimizer", default="adamw_bf16")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--base-precision", default="no_change", choices=QUANTIZATION_CHOICES,
                        help="quantize the frozen base denoiser (--base_model_precision) for both loops, "
                             "e.g. int8-quanto or fp8-torchao")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--output", type=Path, default=None, help="also write the table to this file")
    parser.add_argument("--blocks-to-swap", type=int, default=0,
                        help="our loop: --musubi_blocks_to_swap (the last N transformer blocks wait on the CPU)")
    parser.add_argument("--group-offload", default="none", choices=("none", "block_level", "leaf_level"),
                        help="our loop: --enable_group_offload with this --group_offload_type")
    parser.add_argument("--group-offload-blocks", type=int, default=1, help="--group_offload_blocks_per_group")
    parser.add_argument("--attention", default=None, help="our loop: --attention_mechanism")
    parser.add_argument("--fuse-qkv", action="store_true", help="our loop: --fuse_qkv_projections")
    parser.add_argument("--attention-slice", action="store_true", help="our loop: --unet_attention_slice (UNets)")
    parser.add_argument("--release-gradients", action="store_true",
                        help="our loop: --optimizer_release_gradients (needs an optimi-* --optimizer)")
    args = parser.parse_args(argv)
    if args.arch != "tiny" and args.family != REAL_SIZE_ARCHES[args.arch]:
        parser.error(f"--arch {args.arch} needs --family {REAL_SIZE_ARCHES[args.arch]}")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.dtype == "auto":
        args.dtype = "bf16" if device.type == "cuda" else "fp32"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    preset = PRESETS.get(args.base_precision)
    if preset is not None and preset.requires and (device.type != "cuda" or device_problem(preset)):
        parser.error(f"--base-precision {preset.name} needs {preset.requires}")
    if device.type == "cpu":
        # subnormal optimizer state makes CPU steps erratically slow (10x); flush them for both loops
        torch.set_flush_denormal(True)
    peak, peak_note = peak_tflops(device, args.peak_tflops)

    sizes = [s.strip() for s in args.batch.split(",") if s.strip()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        cfg = bench_config(args, workdir)
        model = build_family(args.family, args.arch, workdir, dtype, device, cfg)
        for size in sizes:
            candidates = [int(size)] if size != "max" else [2**i for i in range(0, 10)]
            best = None
            for bs in candidates:
                try:
                    best = (bs, run_case(args, bs, cfg, model, device, dtype))
                except torch.OutOfMemoryError:
                    _free(device)
                    break
                if size != "max":
                    break
            if best is None:
                print(f"batch {size}: out of memory", file=sys.stderr)
                continue
            rows.append(best)

    header = (f"family={args.family} arch={args.arch} resolution={args.resolution} dtype={args.dtype} "
              f"device={device} lora_rank={args.rank} optimizer={args.optimizer} "
              f"gradient_checkpointing={args.gradient_checkpointing} base_precision={args.base_precision} "
              f"steps={args.steps} warmup={args.warmup} "
              f"repeats={args.repeats} text_tokens={args.text_tokens if args.family in ('flux', 'wan') else 'n/a'} "
              f"frames={args.frames if args.family == 'wan' else 'n/a'}\n"
              f"ours only: blocks_to_swap={args.blocks_to_swap} group_offload={args.group_offload}"
              f"/{args.group_offload_blocks} attention={args.attention or 'diffusers'} fuse_qkv={args.fuse_qkv} "
              f"attention_slice={args.attention_slice} release_gradients={args.release_gradients}\n"
              f"peak for MFU: {peak:.2f} TFLOP/s ({peak_note})\n")
    lines = [f"{'batch':>5} {'loop':<10} {'samples/s':>10} {'s/step':>8} {'peak mem MiB':>13} "
             f"{'data wait s':>11} {'GFLOP/step':>11} {'MFU %':>7} {'ours/ref':>9}"]
    for bs, (ours, ref) in rows:
        for m in (ours, ref):
            sps = bs / m.median()
            mfu = m.flops_per_step / m.median() / (peak * 1e12) * 100
            ratio = f"{ref.median() / ours.median():9.3f}" if m is ours else f"{'':>9}"
            lines.append(f"{bs:>5} {m.name:<10} {sps:>10.2f} {m.median():>8.4f} {m.peak_bytes / 2**20:>13.1f} "
                         f"{m.data_wait:>11.4f} {m.flops_per_step / 1e9:>11.2f} {mfu:>7.2f} {ratio}")
    table = header + "\n".join(lines) + "\n(ours/ref > 1 means kubetuner's step is faster)\n"
    print(table)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
