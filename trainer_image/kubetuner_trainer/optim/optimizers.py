"""Every ``--optimizer`` value: where its class lives, what it needs, and how options map onto it.

How the keyword arguments of an optimizer are chosen (later wins):

1. the optimizer class's own defaults;
2. for Adam-family optimizers, ``--adam_beta1/--adam_beta2``, ``--adam_epsilon`` and
   ``--adam_weight_decay`` (defaults from the option catalog), unless the variant has a
   preset for that value and the option was left unset. The presets are SimpleTuner's own
   settings for that optimizer (e.g. adamw_bf16's eps 1e-6), so an unset option trains alike;
3. ``--optimizer_beta1/--optimizer_beta2`` replace the first/second beta of any optimizer
   that has betas (Lion and Adan included);
4. settings owned by one optimizer: ``--lr_warmup_steps`` → schedule-free ``warmup_steps``,
   ``--prodigy_steps``, ``--seed`` → adamw_bf16's rounding seed;
5. ``--optimizer_config key=value,...`` — any keyword the class accepts except ``lr``
   (the learning rate comes from ``--learning_rate``/the param groups).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from types import MappingProxyType
from typing import Any

from ._settings import explicitly_set, setting
from .optimizer_config import check_against, parse_optimizer_config


@dataclass(frozen=True)
class OptimizerSpec:
    """One ``--optimizer`` choice."""

    name: str
    summary: str
    target: str | None  # "module:Class", imported on use; None when kubetuner does not offer it
    adam_family: bool = False  # --adam_* options apply
    modules: tuple[str, ...] = ()  # Python packages that must be importable
    needs_cuda: bool = False
    compiles_step: bool = False  # the step is built with torch.compile (needs a C++ compiler on CPU)
    schedule_free: bool = False  # replaces the LR schedule; needs train()/eval() calls
    preset: Mapping[str, Any] = field(default_factory=dict)  # variant defaults, below explicitly set options
    fixed: Mapping[str, Any] = field(default_factory=dict)  # always passed; not user-settable
    unsupported: str | None = None  # why kubetuner cannot offer this choice at all
    plain_groups: bool = False  # the class refuses param-group keys of its own (e.g. "name")
    releases_gradients: bool = False  # takes gradient_release=True (--optimizer_release_gradients; optimi)

    def load(self) -> type:
        """Import and return the optimizer class."""
        if self.target is None:
            raise RuntimeError(f"optimizer {self.name!r} is not available: {self.unsupported}")
        module_name, _, attribute = self.target.partition(":")
        return getattr(importlib.import_module(module_name), attribute)

    def accepted_keywords(self) -> dict[str, Any]:
        """Keyword → class default, for every keyword ``--optimizer_config`` may set."""
        return _keywords_of(self.load(), tuple(self.fixed))

    def integer_keywords(self) -> frozenset[str]:
        """Keywords annotated as ``int`` (a fractional value is refused for them)."""
        return _integer_keywords_of(self.load())


@cache
def _keywords_of(cls: type, fixed: tuple[str, ...]) -> dict[str, Any]:
    if hasattr(cls, "_group_keys") and hasattr(cls, "apply_group_defaults"):
        return _sdnq_keywords_of(cls, fixed)
    signature = inspect.signature(cls.__init__)
    return {
        name: parameter.default
        for name, parameter in signature.parameters.items()
        if name not in ("self", "params", "lr", *fixed)
        and parameter.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }


def _sdnq_keywords_of(cls: type, fixed: tuple[str, ...]) -> dict[str, Any]:
    """SDNQ optimizers take their settings as ``**kwargs``: the group keys they declare, with the defaults
    their ``apply_group_defaults`` fills in (``inspect.Parameter.empty`` where it has none). Muon also takes
    every key with a ``muon_`` or ``adamw_`` prefix (its two parameter groups)."""
    declared = cls._group_keys
    keys = set().union(*declared) if isinstance(declared, (list, tuple)) else set(declared)
    try:
        defaults = cls.apply_group_defaults({})
    except Exception:  # Muon needs its parameters to split its groups
        defaults = {}
    accepted = {k: defaults.get(k, inspect.Parameter.empty) for k in keys if k not in ("params", "lr", *fixed)}
    if isinstance(declared, (list, tuple)):
        accepted |= {f"{prefix}_{k}": v for k, v in dict(accepted).items() for prefix in ("muon", "adamw")}
    return accepted


@cache
def _integer_keywords_of(cls: type) -> frozenset[str]:
    parameters = inspect.signature(cls.__init__).parameters.values()
    return frozenset(p.name for p in parameters if p.annotation in (int, "int"))


# SimpleTuner's own settings for these optimizers (its optimizer table, release 3.1.6), used while
# the --adam_* options are left unset so that the same config trains the same way.
_ST_OPTIMI_ADAM = {"betas": (0.9, 0.99), "eps": 1e-6, "weight_decay": 0.0}
_ST_LOW_EPS = {"eps": 1e-6}


def _optimi(name: str, cls: str, summary: str, *, adam: bool, preset: Mapping[str, Any] | None = None) -> OptimizerSpec:
    return OptimizerSpec(
        f"optimi-{name}", summary, f"optimi:{cls}", adam_family=adam, modules=("optimi",),
        fixed={"gradient_release": False}, preset=dict(preset or {}), releases_gradients=True,
    )


def _bnb(name: str, cls: str, summary: str, *, adam: bool) -> OptimizerSpec:
    return OptimizerSpec(
        f"bnb-{name}", summary, f"bitsandbytes.optim:{cls}", adam_family=adam, modules=("bitsandbytes",),
        needs_cuda=True,
    )


def _ao(name: str, cls: str, summary: str) -> OptimizerSpec:
    return OptimizerSpec(
        f"ao-{name}", summary, f"torchao.optim:{cls}", adam_family=True, modules=("torchao",), compiles_step=True,
        preset=_ST_LOW_EPS,
    )


def _sdnq(name: str, cls: str, summary: str, **preset: Any) -> OptimizerSpec:
    # the spec: every SDNQ optimizer keeps quantized state buffers (uint8, group size 32) unless
    # --optimizer_config use_quantized_buffers=false, and rounds stochastically
    return OptimizerSpec(f"sdnq-{name}", summary, f"sdnq.optim:{cls}", modules=("sdnq",), plain_groups=True,
                         preset={"use_quantized_buffers": True, "quantized_buffers_group_size": 32, **preset})


_SPECS: list[OptimizerSpec] = [
    OptimizerSpec(
        "adamw_bf16", "AdamW with fp32 moments and stochastic rounding, accurate on bf16 weights (built in).",
        "kubetuner_trainer.optim.adamw_bf16:AdamWBF16", adam_family=True, preset=_ST_LOW_EPS,
    ),
    _ao("adamw8bit", "AdamW8bit", "torchao AdamW with 8-bit block-quantised moments."),
    _ao("adamw4bit", "AdamW4bit", "torchao AdamW with 4-bit block-quantised moments."),
    _ao("adamfp8", "AdamFp8", "torchao Adam (L2 weight decay) with float8 moments."),
    _ao("adamwfp8", "AdamWFp8", "torchao AdamW with float8 moments."),
    OptimizerSpec(
        "adamw_schedulefree", "Schedule-free AdamW; fp32 master weights for bf16/fp16 parameters.",
        "kubetuner_trainer.optim.schedule_free:ScheduleFreeAdamW", adam_family=True, modules=("schedulefree",),
        schedule_free=True, fixed={"master_weights": True},
    ),
    OptimizerSpec(
        "adamw_schedulefree+aggressive",
        "Schedule-free AdamW with lighter regularisation: weight decay 1e-3 and eps 1e-6 unless "
        "--adam_weight_decay/--adam_epsilon are given.",
        "kubetuner_trainer.optim.schedule_free:ScheduleFreeAdamW", adam_family=True, modules=("schedulefree",),
        schedule_free=True, preset={"weight_decay": 1e-3, "eps": 1e-6}, fixed={"master_weights": True},
    ),
    OptimizerSpec(
        "adamw_schedulefree+no_kahan",
        "Schedule-free AdamW updating low-precision weights in place (no fp32 master copy; less memory, "
        "small updates to bf16 weights can be lost); weight decay 1e-3 and eps 1e-6 by default.",
        "kubetuner_trainer.optim.schedule_free:ScheduleFreeAdamW", adam_family=True, modules=("schedulefree",),
        schedule_free=True, preset={"weight_decay": 1e-3, "eps": 1e-6}, fixed={"master_weights": False},
    ),
    _optimi("stableadamw", "StableAdamW", "torch-optimi StableAdamW (AdamW with per-tensor update clipping).", adam=True,
            preset={"betas": (0.9, 0.99), "eps": 1e-6}),
    _optimi("adamw", "AdamW", "torch-optimi AdamW (Kahan summation for low-precision weights).", adam=True,
            preset=_ST_OPTIMI_ADAM),
    _optimi("lion", "Lion", "torch-optimi Lion (sign-based momentum; use a smaller learning rate).", adam=False),
    _optimi("radam", "RAdam", "torch-optimi RAdam (rectified Adam, no warmup needed).", adam=True,
            preset=_ST_OPTIMI_ADAM),
    _optimi("ranger", "Ranger", "torch-optimi Ranger (RAdam with Lookahead).", adam=True, preset=_ST_OPTIMI_ADAM),
    _optimi("adan", "Adan", "torch-optimi Adan (Nesterov-style adaptive momentum, three betas).", adam=False),
    _optimi("adam", "Adam", "torch-optimi Adam (L2 weight decay).", adam=True, preset=_ST_OPTIMI_ADAM),
    _optimi("sgd", "SGD", "torch-optimi SGD (momentum via --optimizer_config momentum=0.9).", adam=False),
    OptimizerSpec(
        "soap", "SOAP: Adam in the eigenbasis of a Shampoo preconditioner (built in).",
        "kubetuner_trainer.optim.soap:SOAP", adam_family=True, preset={"betas": (0.95, 0.95)},
    ),
    OptimizerSpec(
        "prodigy", "Prodigy: learns its own step size; use --learning_rate=1.0 (prodigyopt).",
        "kubetuner_trainer.optim.prodigy:ProdigyWithSteps", adam_family=True, modules=("prodigyopt",),
        preset={"betas": (0.9, 0.99), "weight_decay": 0.0},
    ),
    _bnb("adagrad", "Adagrad", "bitsandbytes Adagrad.", adam=False),
    _bnb("adagrad8bit", "Adagrad8bit", "bitsandbytes Adagrad with 8-bit state.", adam=False),
    _bnb("adam", "Adam", "bitsandbytes Adam.", adam=True),
    _bnb("adam8bit", "Adam8bit", "bitsandbytes Adam with 8-bit state.", adam=True),
    _bnb("adamw", "AdamW", "bitsandbytes AdamW.", adam=True),
    _bnb("adamw8bit", "AdamW8bit", "bitsandbytes AdamW with 8-bit state.", adam=True),
    _bnb("adamw-paged", "PagedAdamW", "bitsandbytes AdamW with paged (unified-memory) state.", adam=True),
    _bnb("adamw8bit-paged", "PagedAdamW8bit", "bitsandbytes AdamW with paged 8-bit state.", adam=True),
    _bnb("lion", "Lion", "bitsandbytes Lion.", adam=False),
    _bnb("lion8bit", "Lion8bit", "bitsandbytes Lion with 8-bit state.", adam=False),
    _bnb("lion-paged", "PagedLion", "bitsandbytes Lion with paged state.", adam=False),
    _bnb("lion8bit-paged", "PagedLion8bit", "bitsandbytes Lion with paged 8-bit state.", adam=False),
    _bnb("ademamix", "AdEMAMix", "bitsandbytes AdEMAMix (two momentum averages).", adam=True),
    _bnb("ademamix8bit", "AdEMAMix8bit", "bitsandbytes AdEMAMix with 8-bit state.", adam=True),
    _bnb("ademamix-paged", "PagedAdEMAMix", "bitsandbytes AdEMAMix with paged state.", adam=True),
    _bnb("ademamix8bit-paged", "PagedAdEMAMix8bit", "bitsandbytes AdEMAMix with paged 8-bit state.", adam=True),
    _sdnq("adamw", "AdamW", "SDNQ AdamW with uint8 quantized state buffers."),
    _sdnq("adamw+no_quant", "AdamW", "SDNQ AdamW with full-precision state (for comparison).",
          use_quantized_buffers=False),
    _sdnq("adafactor", "Adafactor", "SDNQ Adafactor with quantized state buffers."),
    _sdnq("came", "CAME", "SDNQ CAME with quantized state buffers."),
    _sdnq("lion", "Lion", "SDNQ Lion with quantized state buffers."),
    _sdnq("muon", "Muon", "SDNQ Muon (AdamW for non-matrix parameters) with quantized state buffers."),
    _sdnq("muon+quantized_matmul", "Muon", "SDNQ Muon with INT8 matmuls in its Newton-Schulz iteration.",
          use_quantized_matmul=True),
]

OPTIMIZERS: Mapping[str, OptimizerSpec] = MappingProxyType({spec.name: spec for spec in _SPECS})

_PRESET_OPTIONS = {"weight_decay": ("adam_weight_decay",), "eps": ("adam_epsilon",), "betas": ("adam_beta1", "adam_beta2")}


def optimizer_spec(name: str) -> OptimizerSpec:
    """The table entry for ``--optimizer`` value ``name``; ValueError listing choices if unknown."""
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"optimizer {name!r} is unknown; choose one of: {', '.join(OPTIMIZERS)}") from None


def _use_preset(cfg: Any, spec: OptimizerSpec, key: str) -> bool:
    return key in spec.preset and not any(explicitly_set(cfg, option) for option in _PRESET_OPTIONS[key])


def optimizer_kwargs(cfg: Any, spec: OptimizerSpec, param_dtypes: Sequence[Any] = ()) -> dict[str, Any]:
    """Keyword arguments (besides the param groups) for ``spec``'s class, resolved from ``cfg``.

    Raises OptimizerConfigError for a bad ``--optimizer_config``.
    """
    accepted = spec.accepted_keywords()
    kwargs: dict[str, Any] = {"lr": float(setting(cfg, "learning_rate"))}
    beta_options = any(setting(cfg, option) is not None for option in ("optimizer_beta1", "optimizer_beta2"))
    if "betas" in accepted and (spec.adam_family or beta_options):  # else the class's own betas (2 or 3)
        default = accepted["betas"]
        betas = list(default) if isinstance(default, tuple) else [0.9, 0.999]
        if spec.adam_family:
            pair = spec.preset["betas"] if _use_preset(cfg, spec, "betas") else (
                setting(cfg, "adam_beta1"), setting(cfg, "adam_beta2"))
            betas[0], betas[1] = pair
        for index, option in enumerate(("optimizer_beta1", "optimizer_beta2")):
            value = setting(cfg, option)
            if value is not None:
                betas[index] = value
        kwargs["betas"] = tuple(float(b) for b in betas)
    if spec.adam_family:
        for key, option in (("eps", "adam_epsilon"), ("weight_decay", "adam_weight_decay")):
            if key in accepted:
                kwargs[key] = spec.preset[key] if _use_preset(cfg, spec, key) else float(setting(cfg, option))
    if spec.schedule_free and "warmup_steps" in accepted:
        kwargs["warmup_steps"] = int(setting(cfg, "lr_warmup_steps"))
    if "prodigy_steps" in accepted:
        kwargs["prodigy_steps"] = int(setting(cfg, "prodigy_steps") or 0)
    if spec.name == "adamw_bf16":
        kwargs["seed"] = int(setting(cfg, "seed") or 0)
    if "bf16_stochastic_round" in accepted:
        kwargs["bf16_stochastic_round"] = any(str(dtype) == "torch.bfloat16" for dtype in param_dtypes)
    kwargs.update({k: v for k, v in spec.preset.items() if k not in _PRESET_OPTIONS})
    kwargs.update(spec.fixed)
    if spec.releases_gradients and setting(cfg, "optimizer_release_gradients"):
        kwargs["gradient_release"] = True  # each parameter steps in its backward hook (gradient_release.py)
    overrides = check_against(
        spec.name, parse_optimizer_config(setting(cfg, "optimizer_config")), accepted, spec.integer_keywords()
    )
    kwargs.update(overrides)
    return kwargs
