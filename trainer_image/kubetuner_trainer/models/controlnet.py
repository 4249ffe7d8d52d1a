"""ControlNet (``--controlnet``): building the ControlNet, feeding it the control image, and its config rules.

A ControlNet is a trainable copy of the early part of a family's denoiser that reads a control image
(edges, depth, pose …) and adds residuals to the frozen denoiser's activations. Which diffusers class
it is, how it is built from the denoiser, what it reads of the control image and which denoiser
arguments carry its output are family facts (``ModelFamily.controlnet_*`` hooks); this module is the
family-neutral rest:

* :func:`build_controlnet` — ``--controlnet_model_name_or_path`` (``from_pretrained``), else the family's
  constructor (``from_unet``/``from_transformer``) on the loaded denoiser, with ``--controlnet_custom_config``
  as its keyword arguments. Randomly initialised parts are drawn from a generator seeded with ``--seed``,
  so a resumed LoRA run rebuilds the same ControlNet (what SimpleTuner does, facts from 3.1.6).
* :class:`ControlledDenoiser` — what the family's ``predict`` calls in place of the denoiser: it runs the
  ControlNet on the same inputs and hands its residuals to the frozen denoiser.
* :func:`control_input` — the control tensor of a batch in the form the family's ControlNet reads.
* :func:`controlnet_problems` / :func:`controlnet_warnings` — preflight rules.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, Problem

log = logging.getLogger(__name__)

#: the ControlNet's pipeline component name: also its checkpoint folder, LoRA key prefix and optimizer group
CONTROLNET = "controlnet"


def controlnet_families() -> list[str]:
    """The implemented families that train a ControlNet (their default flavour)."""
    from .registry import family_class, implemented_families

    return [f for f in implemented_families() if family_class(f).supports_controlnet()]


def custom_config(cfg: Any) -> dict[str, Any]:
    """``--controlnet_custom_config`` as a dict (inline JSON object, a file holding one, or unset → ``{}``).

    Raises :class:`ConfigError` naming the option when it is not a JSON object.
    """
    value = getattr(cfg, "controlnet_custom_config", None)
    if value in (None, "", {}):
        return {}
    if isinstance(value, str):
        text = value.strip()
        try:
            value = json.loads(text if text.startswith("{") else Path(text).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ConfigError([Problem("controlnet_custom_config", value, f"is not a JSON object: {error}")]) from None
    if not isinstance(value, dict):
        raise ConfigError([Problem("controlnet_custom_config", value, "must be a JSON object of constructor settings")])
    return dict(value)


def constructor_settings(family_cls: Any) -> list[str]:
    """The keyword arguments ``--controlnet_custom_config`` may set: those of the family's ControlNet constructor."""
    parameters = list(inspect.signature(family_cls.controlnet_builder()).parameters)[1:]
    return [name for name in parameters if name not in ("load_weights_from_unet", "load_weights_from_transformer")]


def controlnet_problems(family_cls: Any, cfg: Any) -> list[Problem]:
    """What ``--controlnet`` cannot be combined with here (checked before anything loads)."""
    problems: list[Problem] = []
    layout = family_cls.for_flavour(cfg.model_flavour, cfg.pretrained_model_name_or_path)
    target = getattr(cfg, "flux_lora_target", None)
    if not cfg.controlnet:
        if target and "controlnet" in str(target) and cfg.model_family == "flux":
            problems.append(Problem("flux_lora_target", target, "targets the ControlNet's layers: set controlnet=true"))
        return problems
    if not layout.supports_controlnet():
        what = f"model_family {cfg.model_family}" + (f" (flavour {cfg.model_flavour})" if cfg.model_flavour else "")
        problems.append(Problem("controlnet", True, f"ControlNet training is not supported yet for {what} (diffusers "
                                                    f"has no ControlNet model and pipeline for it); families that "
                                                    f"train one: {', '.join(controlnet_families())}"))
        return problems
    if cfg.model_type == "lora" and cfg.lora_type == "lycoris":
        problems.append(Problem("lora_type", "lycoris", "is not supported with controlnet; use lora_type=standard "
                                                        "(PEFT LoRA on the ControlNet) or model_type=full"))
    if cfg.model_type == "lora" and cfg.peft_lora_mode == "singlora":
        problems.append(Problem("peft_lora_mode", "singlora", "is not supported with controlnet; leave it unset"))
    if cfg.model_type == "lora" and cfg.lora_format == "comfyui":
        problems.append(Problem("lora_format", "comfyui", "has no ControlNet LoRA layout; use lora_format=diffusers"))
    if getattr(cfg, "tread_config", None):
        problems.append(Problem("tread_config", cfg.tread_config, "cannot be combined with controlnet: the "
                                                                  "ControlNet's residuals cover every image token"))
    if cfg.train_text_encoder:
        problems.append(Problem("train_text_encoder", True, "is not supported with controlnet: only the ControlNet "
                                                            "trains"))
    try:
        settings = custom_config(cfg)
    except ConfigError as error:
        return problems + list(error.problems)
    if settings and not cfg.controlnet_model_name_or_path:
        allowed = constructor_settings(layout)
        unknown = sorted(set(settings) - set(allowed))
        if unknown:
            problems.append(Problem("controlnet_custom_config", settings,
                                    f"{', '.join(unknown)} not known to {layout.controlnet_builder().__qualname__}; "
                                    f"allowed: {', '.join(allowed)}"))
    return problems


def controlnet_warnings(cfg: Any) -> list[Problem]:
    """ControlNet options that are set but have no effect as configured."""
    warnings = []
    if not cfg.controlnet:
        for option in ("controlnet_model_name_or_path", "controlnet_custom_config"):
            if getattr(cfg, option, None) not in (None, "", {}):
                warnings.append(Problem(option, getattr(cfg, option), "has no effect without controlnet=true"))
    elif cfg.controlnet_model_name_or_path and custom_config(cfg):
        warnings.append(Problem("controlnet_custom_config", cfg.controlnet_custom_config,
                                "has no effect: the ControlNet is loaded from controlnet_model_name_or_path"))
    return warnings


def build_controlnet(family_cls: Any, cfg: Any, components: Any, *,
                     weight_dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The ControlNet to train: loaded from ``--controlnet_model_name_or_path`` (a folder, or a hub id),
    else built from the loaded ``components.denoiser`` (before it is quantized). Frozen; the trainable
    decides what trains. Raises :class:`ConfigError` when the location holds no such ControlNet."""
    import diffusers

    cls = getattr(diffusers, family_cls.controlnet_class_name)
    location = cfg.controlnet_model_name_or_path
    if location:
        try:
            controlnet = cls.from_pretrained(str(location), torch_dtype=weight_dtype)
        except (OSError, ValueError) as error:
            raise ConfigError([Problem("controlnet_model_name_or_path", location,
                                       f"holds no {cls.__name__} (a diffusers model folder with config.json): "
                                       f"{error}")]) from None
    else:
        kwargs = {**family_cls.controlnet_init_kwargs(components), **custom_config(cfg)}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg.seed or 0))
            controlnet = family_cls.controlnet_builder()(components.denoiser, **kwargs)
        if controlnet.dtype != weight_dtype:
            controlnet.to(dtype=weight_dtype)
    controlnet.requires_grad_(False)
    return controlnet


def control_input(family: Any, batch: Any, device: torch.device) -> torch.Tensor:
    """The control image of ``batch`` as the family's ControlNet reads it: ``[B, 3, H, W]`` pixels in [0, 1]
    (``controlnet_input = "pixels"``) or the VAE's scaled latents ``[B, C, h, w]`` (``"latents"``).

    The batch's first conditioning slot is the control image (one slot per linked conditioning dataset with
    ``conditioning_multidataset_sampling: combined``, one drawn slot with ``random``). Raises ValueError when
    the batch carries no conditioning image (a dataset without ``conditioning_data``).
    """
    latents = _first_slot(getattr(batch, "conditioning_latents", None))
    pixels = _first_slot(getattr(batch, "conditioning_pixels", None))
    if family.controlnet_input == "latents":
        if latents is None:
            if pixels is None:
                raise ValueError(_NO_CONTROL)
            latents = family.encode_images(pixels)
        return latents.to(device, dtype=torch.float32)
    if pixels is None:
        raise ValueError(_NO_CONTROL)
    return ((pixels.to(device, dtype=torch.float32) + 1.0) / 2.0).clamp(0.0, 1.0)


def cast_floats(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with every floating-point tensor in it (also inside tuples, lists and dicts) cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(cast_floats(v, dtype) for v in value)
    if isinstance(value, dict):  # a diffusers output object stays itself
        for key in list(value):
            value[key] = cast_floats(value[key], dtype)
        return value
    return value


def _first_slot(slots: Any) -> torch.Tensor | None:
    if slots is None or isinstance(slots, torch.Tensor):
        return slots
    return slots[0] if len(slots) else None


_NO_CONTROL = ("controlnet=true but this batch has no conditioning image: link a conditioning dataset "
               "(conditioning_type: controlnet) to every training dataset with conditioning_data")


class ControlledDenoiser:
    """The frozen ``denoiser`` called with ``controlnet``'s residuals for ``control``.

    A family's ``predict`` calls it exactly as it calls its denoiser; each call first runs the ControlNet on
    the same inputs (``ModelFamily.controlnet_residuals``) and adds the arguments carrying its output.
    Attributes (``config``, ``dtype`` …) are the denoiser's; ``training`` is the ControlNet's.
    """

    def __init__(self, family: Any, denoiser: Any, controlnet: torch.nn.Module, control: torch.Tensor):
        self.family = family
        self.denoiser = denoiser
        self.controlnet = controlnet
        self.control = control
        self.training = controlnet.training

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        extra = self.family.controlnet_residuals(self.controlnet, self.control, args, kwargs)
        # in the frozen base's dtype, as SimpleTuner hands them over (a quantized base's layers take no other)
        return self.denoiser(*args, **kwargs, **cast_floats(extra, self.family.weight_dtype))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.denoiser, name)


def controlnet_call_kwargs(family: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Validation-call arguments for the family's ControlNet pipeline, from those of its plain pipeline: the
    control image (``image``: one PIL image, or one per conditioning slot, of which the first is used) goes to
    :attr:`~.family.ModelFamily.controlnet_image_argument`; arguments the ControlNet pipeline does not take
    (e.g. SD3's skip-layer guidance) are dropped, and logged. Raises ValueError without a control image."""
    import diffusers

    kwargs = dict(kwargs)
    image = kwargs.pop("image", None)
    if isinstance(image, (list, tuple)):
        image = image[0] if image else None
    if image is None:
        raise ValueError("controlnet validation renders need a control image: link a conditioning dataset "
                         "(conditioning_type: controlnet) to a training dataset")
    accepted = inspect.signature(getattr(diffusers, family.controlnet_pipeline_class).__call__).parameters
    dropped = sorted(k for k in kwargs if k not in accepted)
    if dropped:
        log.warning("validation: %s has no %s; rendering without", family.controlnet_pipeline_class,
                    ", ".join(dropped))
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    kwargs[family.controlnet_image_argument] = image
    return kwargs
