"""Fitting big models and running them fast: block swap, group offload, model residency, attention
kernels and ``torch.compile`` (the memory, attention and dynamo options).

``preflight_problems(cfg)`` / ``preflight_warnings(cfg)`` are this area's start-up checks (run
before anything loads); :class:`~.offload.MemoryPlan`, :class:`~.attention.AttentionChoice` and
:func:`~.compiling.compile_denoiser` are what the training loop applies.
"""

from __future__ import annotations

from typing import Any

from ..config import Problem
from .offload import MemoryPlan, clear_accelerator_cache, denoiser_placed_by_plan

__all__ = ["MemoryPlan", "clear_accelerator_cache", "configure_vae", "denoiser_placed_by_plan",
           "preflight_problems", "preflight_warnings", "run_device_type"]


def run_device_type() -> str:
    """The device type a run on this machine trains on (what accelerate picks)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def configure_vae(cfg: Any, vae: Any) -> None:
    """``--vae_enable_slicing`` / ``--vae_enable_tiling`` on a loaded VAE (diffusers' own switches)."""
    if getattr(cfg, "vae_enable_slicing", False) and hasattr(vae, "enable_slicing"):
        vae.enable_slicing()
    if getattr(cfg, "vae_enable_tiling", False) and hasattr(vae, "enable_tiling"):
        vae.enable_tiling()


def _family_class(cfg: Any) -> Any:
    from ..models import family_class

    try:
        return family_class(cfg.model_family)
    except ValueError:
        return None  # the core checks report the family


def _block_swap_problems(cfg: Any, device_type: str) -> list[Problem]:
    swap = int(getattr(cfg, "musubi_blocks_to_swap", 0) or 0)
    if swap <= 0:
        return []
    problems: list[Problem] = []
    cls = _family_class(cfg)
    if cls is not None and not cls.transformer_block_lists:
        from ..models import implemented_families

        able = [f for f in implemented_families() if _family_has_blocks(f)]
        problems.append(Problem("musubi_blocks_to_swap", swap,
                                f"the {cls.family} model has no transformer block lists to swap; "
                                f"block swap works with: {', '.join(able)}"))
    if getattr(cfg, "enable_group_offload", False):
        problems.append(Problem("musubi_blocks_to_swap", swap, "cannot be combined with --enable_group_offload; "
                                                               "pick one way to offload the model"))
    device = getattr(cfg, "musubi_block_swap_device", None) or "cpu"
    try:
        import torch

        parsed = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        problems.append(Problem("musubi_block_swap_device", device, f"is not a device string ({exc}); e.g. cpu"))
    else:
        if parsed.type not in ("cpu", device_type):
            problems.append(Problem("musubi_block_swap_device", device,
                                    f"this run has no {parsed.type} device; use cpu"))
    return problems


def _family_has_blocks(name: str) -> bool:
    from ..models import family_class

    return bool(family_class(name).transformer_block_lists)


def slices_attention(family: str) -> bool:
    """Whether the ``family``'s denoiser class can compute attention in slices (diffusers'
    ``set_attention_slice``, which the UNets have)."""
    from ..models import family_class

    return callable(getattr(family_class(family).denoiser_class(), "set_attention_slice", None))


def _attention_slice_problems(cfg: Any) -> list[Problem]:
    if not getattr(cfg, "unet_attention_slice", False):
        return []
    cls = _family_class(cfg)
    if cls is None or slices_attention(cls.family):
        return []
    from ..models import implemented_families

    able = [f for f in implemented_families() if slices_attention(f)]
    return [Problem("unet_attention_slice", True,
                    f"the {cls.family} model's {cls.denoiser_class_name} has no attention slicing in diffusers; "
                    f"it works with: {', '.join(able)}")]


#: why --group_offload_to_disk_path is refused (measured on CPU with diffusers 0.42: LoRA runs of the tiny SD 1.x UNet
#: and of Flux with leaf_level turn NaN from the second step)
SPILL_REFUSAL = ("diffusers' disk spill replaces each group's weights with empty tensors after its forward pass, "
                 "while the backward pass still reads the weights it saved (convolutions, norms), so training "
                 "diverges; offload to CPU memory (leave it unset) or use --musubi_blocks_to_swap")


def _spill_problems(cfg: Any) -> list[Problem]:
    """``--group_offload_to_disk_path``: diffusers' spill is made for inference (see ``SPILL_REFUSAL``)."""
    folder = getattr(cfg, "group_offload_to_disk_path", None)
    if not folder or not getattr(cfg, "enable_group_offload", False):
        return []
    return [Problem("group_offload_to_disk_path", folder, f"cannot train: {SPILL_REFUSAL}")]


def fuses_projections(family: str) -> bool:
    """Whether the ``family``'s denoiser trains with diffusers' ``fuse_qkv_projections`` (its class has the method
    and the family does not say otherwise: ``ModelFamily.qkv_fusion``)."""
    from ..models import family_class

    cls = family_class(family)
    return cls.qkv_fusion and callable(getattr(cls.denoiser_class(), "fuse_qkv_projections", None))


def _fuse_problems(cfg: Any) -> list[Problem]:
    """``--fuse_qkv_projections`` is built for a standard PEFT LoRA on the denoiser (training/fused_qkv.py)."""
    if not getattr(cfg, "fuse_qkv_projections", False):
        return []
    unbuilt = [(option, value) for option, value, asks in (
        ("model_type", "full", getattr(cfg, "model_type", None) == "full"),
        ("lora_type", "lycoris", getattr(cfg, "lora_type", None) == "lycoris"),
        ("peft_lora_mode", "singlora", getattr(cfg, "peft_lora_mode", None) == "singlora"),
        ("controlnet", True, bool(getattr(cfg, "controlnet", False)))) if asks]
    problems = [Problem("fuse_qkv_projections", True,
                        f"kubetuner fuses the projections for a standard LoRA on the denoiser only, not with "
                        f"--{option}={value} (its trained weights would have to be split back into to_q/to_k/to_v "
                        "before every save)") for option, value in unbuilt]
    if getattr(cfg, "unet_attention_slice", False):
        problems.append(Problem("fuse_qkv_projections", True, "cannot be combined with --unet_attention_slice: "
                                                              "sliced attention calls the separate projections"))
    cls = _family_class(cfg)
    if cls is not None and not fuses_projections(cls.family):
        from ..models import implemented_families

        able = [f for f in implemented_families() if fuses_projections(f)]
        problems.append(Problem("fuse_qkv_projections", True,
                                f"the {cls.family} model's {cls.denoiser_class_name} cannot train with diffusers' "
                                f"fused attention projections; it works with: {', '.join(able)}"))
    return problems


def preflight_problems(cfg: Any) -> list[Problem]:
    """This area's configuration errors: kernels this machine cannot run, block swap where there are no
    blocks to swap, and combinations that cannot work together."""
    from .attention import attention_problems

    device_type = run_device_type()
    problems = attention_problems(cfg, device_type) + _block_swap_problems(cfg, device_type) + \
        _attention_slice_problems(cfg)
    if getattr(cfg, "enable_group_offload", False) and getattr(cfg, "group_offload_use_stream", False) \
            and device_type == "cuda":
        problems.append(Problem("group_offload_use_stream", True,
                                "diffusers' streamed group offloading keeps the pinned copy of each group made at "
                                "start and would revert the trained weights; leave it off for training"))
    location = getattr(cfg, "pretrained_model_name_or_path", None) or ""
    if getattr(cfg, "fully_unload_text_encoder", False) and location:
        from ..models.loading import is_single_file

        quantized = [f"text_encoder_{i}_precision" for i in range(1, 5)
                     if getattr(cfg, f"text_encoder_{i}_precision", None) not in (None, "no_change")]
        if quantized:
            problems.append(Problem("fully_unload_text_encoder", True,
                                    f"cannot be combined with --{quantized[0]}: the text encoders are loaded again "
                                    "unquantized, so embeddings would no longer match the cache"))
        if is_single_file(location):
            problems.append(Problem("fully_unload_text_encoder", True,
                                    "needs a diffusers folder or hub id to load the text encoders again from; "
                                    f"{location} is a single checkpoint file"))
    if getattr(cfg, "ramtorch", False):
        from .ramtorch import REQUIREMENT

        if device_type != "cuda":
            problems.append(Problem("ramtorch", True, f"needs {REQUIREMENT}; this run's device is {device_type}"))
        if (getattr(cfg, "musubi_blocks_to_swap", 0) or 0) > 0:
            problems.append(Problem("ramtorch", True, "cannot be combined with --musubi_blocks_to_swap; pick one "
                                                      "way to offload the model"))
        precision = getattr(cfg, "base_model_precision", None) or "no_change"
        if precision != "no_change":
            problems.append(Problem("ramtorch", True,
                                    f"cannot be combined with --base_model_precision={precision}: RamTorch streams "
                                    "plain Linear weights (quanto's quantized layers are not converted, other "
                                    "formats would be copied as plain tensors); block swap (--musubi_blocks_to_swap) "
                                    "moves quantized weights as they are"))
    problems += _spill_problems(cfg) + _fuse_problems(cfg)
    compiled = (getattr(cfg, "dynamo_backend", None) or "no") != "no"
    if compiled and denoiser_placed_by_plan(cfg):
        option = next(name for name in ("musubi_blocks_to_swap", "enable_group_offload", "ramtorch")
                      if getattr(cfg, name, None))
        problems.append(Problem("dynamo_backend", cfg.dynamo_backend,
                                f"cannot be combined with --{option} (its hooks move weights between compiled "
                                "calls); use dynamo_backend=no or turn the offloading off"))
    return problems


#: options SimpleTuner hands only to something kubetuner does not run: accepted (a SimpleTuner config that
#: sets them trains there), each with why it changes nothing (SimpleTuner 3.1.6: helpers/training/deepspeed.py,
#: helpers/models/hunyuanvideo/autoencoder.py, trainer.init_controlnet_model)
NO_EFFECT: dict[str, str] = {
    "offload_param_path": "has no effect: SimpleTuner passes it only to DeepSpeed ZeRO's NVMe parameter offload "
                          "(with --deepspeed_config), and kubetuner does not run DeepSpeed; to keep weights off the "
                          "accelerator use --musubi_blocks_to_swap, --enable_group_offload (with "
                          "--group_offload_to_disk_path to spill them to disk) or --ramtorch",
    "vae_enable_patch_conv": "has no effect: SimpleTuner patches the 3D convolutions of the HunyuanVideo VAE only "
                             "(model_family hunyuanvideo, which kubetuner does not support yet); for other VAEs use "
                             "--vae_enable_slicing or --vae_enable_tiling",
    "ramtorch_controlnet": "has no effect: kubetuner keeps a trained ControlNet (--controlnet) on the accelerator; "
                           "--ramtorch streams the frozen base model's Linear layers (and with "
                           "--ramtorch_text_encoder/--ramtorch_vae the helpers')",
}


def _no_effect_warnings(cfg: Any) -> list[Problem]:
    from ..optim._settings import asks_for_something

    warnings = [Problem(name, getattr(cfg, name), why) for name, why in NO_EFFECT.items()
                if asks_for_something(cfg, name)]
    if asks_for_something(cfg, "sla_config") and (getattr(cfg, "attention_mechanism", None) or "") != "sla":
        warnings.append(Problem("sla_config", cfg.sla_config, "has no effect: it tunes --attention_mechanism=sla "
                                                              "only"))
    return warnings


def preflight_warnings(cfg: Any) -> list[Problem]:
    """Options that have no effect as configured."""
    warnings: list[Problem] = _no_effect_warnings(cfg)
    precision = getattr(cfg, "base_model_precision", None) or "no_change"
    if getattr(cfg, "fuse_qkv_projections", False) and precision != "no_change":
        warnings.append(Problem("fuse_qkv_projections", True,
                                f"with --base_model_precision={precision} diffusers builds the fused layers from the "
                                "dequantized weights: they are not quantized, and the quantized separate layers stay "
                                "loaded, so the attention projections take more memory than without fusing"))
    if getattr(cfg, "group_offload_to_disk_path", None) and not getattr(cfg, "enable_group_offload", False):
        warnings.append(Problem("group_offload_to_disk_path", cfg.group_offload_to_disk_path,
                                "has no effect without --enable_group_offload"))
    if getattr(cfg, "unet_attention_slice", False) and (getattr(cfg, "attention_mechanism", None) or "diffusers") \
            != "diffusers":
        warnings.append(Problem("attention_mechanism", cfg.attention_mechanism,
                                "has no effect with --unet_attention_slice: sliced attention computes its own "
                                "softmax(QK^T)V per slice"))
    if getattr(cfg, "musubi_blocks_to_swap", 0) and getattr(cfg, "model_type", None) == "full":
        warnings.append(Problem("musubi_blocks_to_swap", cfg.musubi_blocks_to_swap,
                                "has no effect on full fine-tuning: block swap moves only frozen weights"))
    return warnings
