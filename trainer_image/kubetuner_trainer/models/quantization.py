"""Quantized base models and text encoders: ``--base_model_precision``, ``--text_encoder_N_precision``.

Every preset of the option catalog (``QUANTIZATION_CHOICES``) maps to one library:

* ``*-quanto`` — optimum-quanto's ``quantize``/``freeze`` (weights, and activations with
  ``--quantize_activations``);
* ``int8-torchao``/``int4-torchao`` — torchao's int8/int4 weight-only configs (the base is frozen, so
  only gradients with respect to its inputs are needed), ``fp8-torchao`` its float8 training linears;
* ``nf4-bnb`` — bitsandbytes 4-bit NF4, always applied by Diffusers/Transformers at load time;
* ``*-sdnq`` — SDNQ's post-load quantization at that weight dtype (SVD below 5 bits, as the spec says).

Where it runs follows ``--quantize_via``: ``cpu`` quantizes before the model moves to the device,
``accelerator`` moves it first, ``pipeline`` hands a quantization config to ``from_pretrained``
(from the preset, or from ``--quantization_config``'s entry for that component).

The options map onto a family's components through the family interface: ``base_model_precision``
→ the denoiser, ``text_encoder_N_precision`` → the N-th text encoder in pipeline order
(``ModelFamily.text_encoder_names``). Only the frozen base is quantized; LoRA weights stay in fp32
and save unquantized, so the adapter loads into the ordinary pipeline.

Presets that need CUDA are refused at configuration time elsewhere (:func:`quantization_problems`),
naming the preset and what it needs.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from ..config import Problem
from ..config.rules import PRECISION_OPTIONS, UNQUANTIZED
from ..options.catalog import QUANTIZATION_CHOICES, SDNQ_PRESETS

log = logging.getLogger(__name__)

#: Python package each backend needs (import name)
BACKEND_MODULES = {"quanto": "optimum.quanto", "torchao": "torchao", "bnb": "bitsandbytes", "sdnq": "sdnq"}

CUDA = "a CUDA GPU"
#: float8 matmuls (torch._scaled_mm) need compute capability 8.9+ (the spec names Hopper and Blackwell)
FP8_GPU = "a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper H100/H200, Blackwell)"
FP8_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class QuantPreset:
    """One ``*_precision`` choice: its backend, the library's name for the level, and what it needs."""

    name: str
    backend: str
    level: str
    requires: str | None = None  # the device it needs (None: runs anywhere torch runs)
    capability: tuple[int, int] | None = None  # minimum CUDA compute capability
    pipeline_only: bool = False  # only Diffusers/Transformers can apply it (at load time)

    @property
    def module(self) -> str:
        return BACKEND_MODULES[self.backend]


def _preset(name: str) -> QuantPreset:
    level, _, backend = name.rpartition("-")
    if backend == "quanto":
        # SimpleTuner offers the fp8 quanto levels only on CUDA machines
        fp8 = level.startswith("fp8")
        return QuantPreset(name, "quanto", {"fp8": "qfloat8", "fp8uz": "qfloat8_e4m3fnuz"}.get(level, f"q{level}"),
                           requires=CUDA if fp8 else None)
    if backend == "torchao":
        if level == "fp8":
            return QuantPreset(name, "torchao", level, requires=FP8_GPU, capability=FP8_CAPABILITY)
        return QuantPreset(name, "torchao", level, requires=CUDA if level == "int4" else None)
    if backend == "bnb":
        return QuantPreset(name, "bnb", level, requires=CUDA, pipeline_only=True)
    if backend == "sdnq":
        return QuantPreset(name, "sdnq", level)
    raise ValueError(f"unknown quantization preset {name!r}")


#: every preset of the catalog but ``no_change``
PRESETS: Mapping[str, QuantPreset] = {n: _preset(n) for n in QUANTIZATION_CHOICES if n not in UNQUANTIZED}
assert all(PRESETS[n].backend == "sdnq" for n in SDNQ_PRESETS)


def preset_for(cfg: Any, option: str) -> QuantPreset | None:
    """The preset ``option`` asks for (None when unset or ``no_change``)."""
    return PRESETS.get(getattr(cfg, option, None) or "no_change")


def component_options(family_cls: Any) -> dict[str, str]:
    """precision option → the component it quantizes (pipeline name), for this family.

    ``base_model_precision`` → the denoiser; ``text_encoder_N_precision`` → the N-th text encoder.
    """
    names = (family_cls.denoiser_name, *family_cls.text_encoder_names)
    return dict(zip(PRECISION_OPTIONS, names, strict=False))


def is_quantized(cfg: Any) -> bool:
    """Whether any component of the run is quantized (by a preset or ``--quantization_config``)."""
    return any(preset_for(cfg, o) for o in PRECISION_OPTIONS) or bool(_qconfig(cfg))


def base_weight_dtype(cfg: Any) -> Any:
    """dtype of the weights a quantized base keeps unquantized (``--base_model_default_dtype``)."""
    import torch

    return torch.float32 if getattr(cfg, "base_model_default_dtype", None) == "fp32" else torch.bfloat16


# ----------------------------------------------------------------------------- configuration checks
def cuda_capability() -> tuple[int, int] | None:
    """The first CUDA device's compute capability, or None without CUDA."""
    import torch

    return tuple(torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else None


def device_problem(preset: QuantPreset) -> str | None:
    """Why ``preset`` cannot run on this machine (None when it can)."""
    if preset.requires is None:
        return None
    capability = cuda_capability()
    if capability is None or (preset.capability and capability < preset.capability):
        found = "none" if capability is None else f"compute capability {capability[0]}.{capability[1]}"
        return (f"needs {preset.requires}; this machine has {found}. Presets that run anywhere: "
                f"{', '.join(n for n, p in PRESETS.items() if p.requires is None and p.backend != 'sdnq')}, *-sdnq")
    return None


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:
        return True


def quantization_problems(cfg: Any, family_cls: Any | None = None) -> list[Problem]:
    """Every quantization problem of ``cfg`` on this machine (empty: the run can start).

    Checks each preset's package and device requirement, that a quantized base trains an adapter
    (not the quantized weights), and that ``--quantization_config`` names this family's components
    and backends that can build a config.
    """
    problems: list[Problem] = []
    for option in PRECISION_OPTIONS:
        preset = preset_for(cfg, option)
        if preset is None:
            continue
        if _missing(preset.module):
            problems.append(Problem(option, preset.name, f"needs the Python package {preset.module!r}, which is "
                                                         "not installed in this trainer image"))
        elif why := device_problem(preset):
            problems.append(Problem(option, preset.name, why))
    if getattr(cfg, "model_type", None) == "full" and preset_for(cfg, "base_model_precision"):
        problems.append(Problem("base_model_precision", cfg.base_model_precision,
                                "quantized weights cannot be trained directly; use model_type=lora (the adapter "
                                "trains in full precision on the quantized base) or no_change"))
    problems += _qconfig_problems(cfg, family_cls)
    return problems


def quantization_warnings(cfg: Any, family_cls: Any | None = None) -> list[Problem]:
    """Quantization options that have no effect as configured (logged, training goes ahead)."""
    warnings: list[Problem] = []
    if family_cls is not None:
        used = component_options(family_cls)
        for option in PRECISION_OPTIONS:
            if option not in used and preset_for(cfg, option):
                warnings.append(Problem(option, getattr(cfg, option),
                                        f"has no effect: {family_cls.family} has "
                                        f"{len(family_cls.text_encoder_names)} text encoder(s)"))
    if getattr(cfg, "quantize_activations", False):
        quanto = [o for o in PRECISION_OPTIONS if (p := preset_for(cfg, o)) and p.backend == "quanto"]
        if not quanto or getattr(cfg, "quantize_via", None) == "pipeline":
            warnings.append(Problem("quantize_activations", True,
                                    "has no effect: only quanto presets quantized with --quantize_via cpu or "
                                    "accelerator quantize activations"))
    return warnings


# ----------------------------------------------------------------------------- --quantization_config
def _qconfig(cfg: Any) -> dict[str, Any]:
    raw = getattr(cfg, "quantization_config", None)
    if raw in (None, "", {}):
        return {}
    if isinstance(raw, str):
        text = Path(raw).read_text(encoding="utf-8") if Path(raw).is_file() else raw
        raw = json.loads(text)
    if not isinstance(raw, dict):
        raise ValueError("must be a JSON object keyed by component (unet, transformer, text_encoder, …, default)")
    return raw


def _qconfig_problems(cfg: Any, family_cls: Any | None) -> list[Problem]:
    option = "quantization_config"
    try:
        entries = _qconfig(cfg)
    except (ValueError, OSError) as exc:
        return [Problem(option, "<set>", str(exc))]
    if not entries:
        return []
    problems: list[Problem] = []
    known = ("default", *component_options(family_cls).values()) if family_cls is not None else None
    for key, entry in entries.items():
        if known is not None and key not in known:
            problems.append(Problem(option, key, f"is not a component of {family_cls.family}; use one of: "
                                                 f"{', '.join(known)}"))
            continue
        try:
            backend = entry_backend(entry)
            build_entry_config(entry, library="diffusers", compute_dtype=None)
        except (TypeError, ValueError, ImportError) as exc:
            problems.append(Problem(option, key, str(exc)))
            continue
        if backend == "bnb" and cuda_capability() is None:
            problems.append(Problem(option, key, f"bitsandbytes quantization needs {CUDA}; this machine has none"))
    return problems


def entry_backend(entry: Any) -> str:
    """The backend of one ``--quantization_config`` entry: its ``quant_method``, else inferred from its keys.

    ``load_in_4bit``/``load_in_8bit`` → bitsandbytes, ``quant_type`` → torchao, ``weights_dtype``/``weights``
    → quanto (SDNQ needs ``"quant_method": "sdnq"``). Raises ValueError when it cannot tell.
    """
    if not isinstance(entry, Mapping):
        raise ValueError("each entry must be a JSON object of quantization settings")
    method = str(entry.get("quant_method", "")).lower()
    aliases = {"bitsandbytes": "bnb", "bnb": "bnb", "torchao": "torchao", "quanto": "quanto", "sdnq": "sdnq"}
    if method:
        if method not in aliases:
            raise ValueError(f"quant_method {method!r} is not supported; use bitsandbytes, torchao, quanto or sdnq")
        return aliases[method]
    if "load_in_4bit" in entry or "load_in_8bit" in entry:
        return "bnb"
    if "quant_type" in entry:
        return "torchao"
    if "weights_dtype" in entry or "weights" in entry:
        return "quanto"
    raise ValueError("cannot tell the backend; add \"quant_method\" (bitsandbytes, torchao, quanto or sdnq)")


def _torchao_quant_type(value: Any) -> Any:
    import torchao.quantization as aoq

    if isinstance(value, Mapping):  # keyword arguments of int4 weight-only (the spec's example)
        return aoq.Int4WeightOnlyConfig(**value)
    if isinstance(value, str) and isinstance(getattr(aoq, value, None), type):
        return getattr(aoq, value)()
    raise ValueError(f"quant_type {value!r}: give a torchao.quantization config class name (e.g. "
                     "Int8WeightOnlyConfig) or an object of Int4WeightOnlyConfig settings")


def build_entry_config(entry: Mapping[str, Any], *, library: str, compute_dtype: Any) -> Any:
    """The Diffusers (``library="diffusers"``) or Transformers quantization config for one entry."""
    lib = importlib.import_module(library)
    settings = {k: v for k, v in entry.items() if k != "quant_method"}
    backend = entry_backend(entry)
    if backend == "bnb":
        if compute_dtype is not None:
            settings.setdefault("bnb_4bit_compute_dtype", compute_dtype)
        return lib.BitsAndBytesConfig(**settings)
    if backend == "torchao":
        settings["quant_type"] = _torchao_quant_type(settings.get("quant_type"))
        return lib.TorchAoConfig(**settings)
    if backend == "quanto":
        # Diffusers names the weight level weights_dtype, Transformers weights
        level = settings.pop("weights_dtype", settings.pop("weights", "int8"))
        key = "weights_dtype" if library == "diffusers" else "weights"
        return lib.QuantoConfig(**{key: level}, **settings)
    import sdnq

    return sdnq.SDNQConfig(**settings)


def _preset_entry(preset: QuantPreset, *, activations: bool, library: str) -> dict[str, Any]:
    """The ``--quantization_config``-style entry a preset stands for under ``--quantize_via pipeline``."""
    if preset.backend == "bnb":
        return {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_use_double_quant": True,
                "bnb_4bit_quant_type": "nf4"}
    if preset.backend == "torchao":
        name = {"int8": "Int8WeightOnlyConfig", "int4": "Int4WeightOnlyConfig", "fp8": "Float8WeightOnlyConfig"}
        return {"quant_method": "torchao", "quant_type": name[preset.level]}
    if preset.backend == "quanto":
        # Diffusers maps the FP8-NUZ level onto float8 weights (the spec says so)
        level = {"qfloat8": "float8", "qfloat8_e4m3fnuz": "float8"}.get(preset.level, preset.level[1:])
        entry: dict[str, Any] = {"quant_method": "quanto", "weights_dtype": level}
        if activations and library == "transformers":
            entry["activations"] = level
        return entry
    return {"quant_method": "sdnq", **_sdnq_settings(preset)}


def pipeline_quantization(family_cls: Any, cfg: Any, weight_dtype: Any) -> dict[str, Any]:
    """Component name → quantization config for ``from_pretrained`` (empty when nothing loads quantized).

    With ``--quantize_via pipeline`` every preset and ``--quantization_config`` entry applies here;
    otherwise only the pipeline-only presets (``nf4-bnb``) do.
    """
    via_pipeline = getattr(cfg, "quantize_via", None) == "pipeline"
    entries = _qconfig(cfg) if via_pipeline else {}
    denoiser = family_cls.denoiser_name
    configs: dict[str, Any] = {}
    for option, component in component_options(family_cls).items():
        library = "diffusers" if component == denoiser else "transformers"
        entry = entries.get(component, entries.get("default"))
        preset = preset_for(cfg, option)
        if entry is None and preset is not None and (via_pipeline or preset.pipeline_only):
            entry = _preset_entry(preset, activations=bool(getattr(cfg, "quantize_activations", False)),
                                  library=library)
        if entry is not None:
            backend = entry_backend(entry)
            if backend == "sdnq":
                import sdnq  # noqa: F401 - registers SDNQ's quantizer with Diffusers and Transformers
            elif backend == "quanto":
                _contiguous_quanto_cpu_matmul()
            configs[component] = build_entry_config(entry, library=library, compute_dtype=weight_dtype)
    return configs


# ----------------------------------------------------------------------------- quantizing loaded modules
def _sdnq_settings(preset: QuantPreset) -> dict[str, Any]:
    from sdnq.common import dtype_dict

    bits = dtype_dict[preset.level]["num_bits"]
    return {"weights_dtype": preset.level, "use_svd": bits < 5}


def quantize_module(module: Any, preset: QuantPreset, *, activations: bool = False,
                    exclude: tuple[str, ...] = ()) -> Any:
    """Quantize a loaded module in place with ``preset``'s library; returns the module.

    ``exclude`` lists module-name patterns (fnmatch, quanto's convention) to leave in full precision.
    Raises ValueError for a pipeline-only preset (it must be applied by ``from_pretrained``).
    """
    if preset.pipeline_only:
        raise ValueError(f"{preset.name} is applied at load time, not to a loaded module")
    if preset.backend == "quanto":
        import optimum.quanto as quanto

        _contiguous_quanto_cpu_matmul()
        level = getattr(quanto, preset.level)
        quanto.quantize(module, weights=level, activations=level if activations else None,
                        exclude=list(exclude) or None)
        quanto.freeze(module)
        return module
    if preset.backend == "torchao":
        return _torchao(module, preset, exclude)
    from sdnq import sdnq_post_load_quant

    return sdnq_post_load_quant(module, **_sdnq_settings(preset), modules_to_not_convert=list(exclude) or None,
                                torch_dtype=next(module.parameters()).dtype)


@cache
def _contiguous_quanto_cpu_matmul() -> None:
    """Replace quanto's CPU int8 matmul kernel with one that makes its activations contiguous.

    optimum-quanto 0.2.7 hands bf16 activations to ``torch._weight_int8pack_mm`` as they come, and
    that kernel refuses a non-contiguous input (e.g. a transposed gradient in the backward pass:
    "A must be contiguous on the last dimension"). The arithmetic is quanto's own.
    """
    import torch
    from optimum.quanto.library import qbytes_mm as kernels

    def qbytes_mm(activations: torch.Tensor, weights: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        if activations.dtype == torch.int8 and weights.dtype == torch.int8:
            return kernels.qbytes_int_mm(activations, weights, scales)
        if activations.dtype == torch.bfloat16 and weights.dtype == torch.int8 and activations.shape[-1] % 4 == 0:
            return kernels.qbytes_int8pack_mm(activations.contiguous(), weights, scales)
        return kernels.qbytes_mm(activations, weights, scales)

    library = torch.library.Library("quanto", "IMPL")
    library.impl("qbytes_mm", qbytes_mm, "CPU", allow_override=True)
    _KEEP.append(library)  # a Library deregisters its kernels when garbage-collected


_KEEP: list[Any] = []


#: module names fp8-torchao leaves in full precision in every family (SimpleTuner 3.1.6's float8 filter: the
#: top-level output projection)
FP8_TORCHAO_EXCLUDE = ("proj_out",)


def _torchao(module: Any, preset: QuantPreset, exclude: tuple[str, ...]) -> Any:
    import fnmatch

    import torch
    from torchao.quantization import quantize_

    def keep(mod: torch.nn.Module, fqn: str) -> bool:
        return isinstance(mod, torch.nn.Linear) and not any(fnmatch.fnmatch(fqn, p) for p in exclude)

    if preset.level in ("int8", "int4"):
        # weight-only: the frozen base only needs gradients with respect to its inputs
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

        config = Int8WeightOnlyConfig() if preset.level == "int8" else Int4WeightOnlyConfig()
        quantize_(module, config, filter_fn=keep)
    else:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        def fits(mod: torch.nn.Module, fqn: str) -> bool:  # float8 matmuls need dims divisible by 16
            return (keep(mod, fqn) and fqn not in FP8_TORCHAO_EXCLUDE
                    and mod.in_features % 16 == 0 and mod.out_features % 16 == 0)

        module = convert_to_float8_training(module, module_filter_fn=fits,
                                            config=Float8LinearConfig(pad_inner_dim=True))
    return module


def quantize_components(family_cls: Any, cfg: Any, components: Any, device: Any) -> None:
    """Quantize the loaded denoiser and text encoders as their precision options ask (in place).

    ``--quantize_via accelerator`` moves each component to ``device`` first; ``cpu`` quantizes where
    it was loaded. Components quantized at load time (``pipeline``, ``nf4-bnb``) are left alone.
    """
    if getattr(cfg, "quantize_via", None) == "pipeline":
        return
    activations = bool(getattr(cfg, "quantize_activations", False))
    exclude = tuple(getattr(family_cls, "quantization_exclude", ()))
    for option, component in component_options(family_cls).items():
        preset = preset_for(cfg, option)
        if preset is None or preset.pipeline_only:
            continue
        is_denoiser = component == family_cls.denoiser_name
        index = family_cls.text_encoder_names.index(component) if not is_denoiser else None
        module = components.denoiser if is_denoiser else components.text_encoders[index]
        if getattr(cfg, "quantize_via", None) == "accelerator":
            module.to(device)
        log.info("quantizing %s with %s", component, preset.name)
        quantized = quantize_module(module, preset, activations=activations,
                                    exclude=exclude if is_denoiser else ())
        if is_denoiser:
            components.denoiser = quantized
        else:
            components.text_encoders[index] = quantized
