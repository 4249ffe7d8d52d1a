"""Configuration checks for the optimizer, LR schedule and EMA that need this machine's facts.

``preflight_problems(cfg)`` returns every problem at once (empty when the run can start):
an optimizer whose package is missing or which needs a CUDA device, a malformed
``--optimizer_config``, option combinations that cannot work. ``build_optimizer`` and
``build_lr_scheduler`` raise ``ConfigError`` with the same problems.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from typing import Any

from ..config import Problem
from ._settings import asks_for_something, setting
from .optimizer_config import OptimizerConfigError
from .optimizers import OPTIMIZERS, OptimizerSpec, optimizer_kwargs
from .schedulers import SCHEDULERS

_EMA_OPTIONS = ("ema_device", "ema_cpu_only", "ema_foreach_disable", "ema_update_interval", "ema_decay")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def cxx_compiler() -> str | None:
    """The C++ compiler torch.compile would use on CPU, if any."""
    configured = os.environ.get("CXX")
    if configured and shutil.which(configured):
        return configured
    for name in ("g++", "c++", "clang++"):
        if shutil.which(name):
            return name
    return None


def _missing_module(spec: OptimizerSpec) -> str | None:
    for module in spec.modules:
        if importlib.util.find_spec(module) is None:
            return module
    return None


def optimizer_problems(cfg: Any) -> list[Problem]:
    name = setting(cfg, "optimizer")
    if name is None:
        return []  # "is required" is reported by config validation
    spec = OPTIMIZERS.get(name)
    if spec is None:
        return [Problem("optimizer", name, f"kubetuner has no implementation; choose one of: {', '.join(OPTIMIZERS)}")]
    if spec.unsupported:
        return [Problem("optimizer", name, spec.unsupported)]
    problems = []
    missing = _missing_module(spec)
    if missing:
        problems.append(Problem(
            "optimizer", name, f"needs the Python package {missing!r}, which is not installed in this trainer image",
        ))
    if spec.needs_cuda and not cuda_available():
        problems.append(Problem("optimizer", name, "needs a CUDA device; this machine has none"))
    if spec.compiles_step and not cuda_available() and cxx_compiler() is None:
        problems.append(Problem(
            "optimizer", name,
            "compiles its update with torch.compile, which needs a C++ compiler (g++/clang++) on a machine "
            "without CUDA; none was found",
        ))
    if not missing:
        try:
            spec.load()
        except Exception as error:  # a broken install must surface as a config problem, not a crash
            problems.append(Problem("optimizer", name, f"cannot be imported: {type(error).__name__}: {error}"))
        else:
            try:
                optimizer_kwargs(cfg, spec)
            except OptimizerConfigError as error:
                problems.append(Problem("optimizer_config", setting(cfg, "optimizer_config"), str(error)))
    return problems


def scheduler_problems(cfg: Any) -> list[Problem]:
    name = setting(cfg, "lr_scheduler")
    problems = []
    if name not in SCHEDULERS:
        problems.append(Problem("lr_scheduler", name, f"unknown schedule; choose one of: {', '.join(SCHEDULERS)}"))
    if name == "polynomial":
        lr, lr_end = float(setting(cfg, "learning_rate")), float(setting(cfg, "lr_end"))
        if lr_end > lr:
            problems.append(Problem(
                "lr_end", lr_end, f"must not exceed --learning_rate ({lr:g}) for the polynomial schedule",
            ))
    if int(setting(cfg, "lr_num_cycles")) < 1:
        problems.append(Problem("lr_num_cycles", setting(cfg, "lr_num_cycles"), "must be at least 1"))
    return problems


def ema_problems(cfg: Any) -> list[Problem]:
    problems = []
    decay = setting(cfg, "ema_decay")
    if not 0.0 <= float(decay) < 1.0:
        problems.append(Problem("ema_decay", decay, "must be at least 0 and below 1 (e.g. 0.999)"))
    if int(setting(cfg, "ema_update_interval")) < 1:
        problems.append(Problem("ema_update_interval", setting(cfg, "ema_update_interval"), "must be at least 1"))
    return problems


def preflight_problems(cfg: Any) -> list[Problem]:
    """Every optimizer/schedule/EMA problem of ``cfg`` on this machine (empty list: all fine)."""
    from .gradient_release import release_problems

    return optimizer_problems(cfg) + scheduler_problems(cfg) + ema_problems(cfg) + release_problems(cfg)


def preflight_warnings(cfg: Any) -> list[Problem]:
    """Options the user set that have no effect in this combination (SimpleTuner ignores them too).

    Each names the option and says why; training goes ahead.
    """
    from .gradient_release import release_warnings

    warnings = release_warnings(cfg)
    name = setting(cfg, "optimizer")
    spec = OPTIMIZERS.get(name or "")
    schedule_free = bool(spec and spec.schedule_free)
    if asks_for_something(cfg, "prodigy_steps") and name != "prodigy":
        warnings.append(Problem("prodigy_steps", setting(cfg, "prodigy_steps"),
                                "has no effect: it only applies to --optimizer=prodigy"))
    scheduler = setting(cfg, "lr_scheduler")
    if schedule_free and asks_for_something(cfg, "lr_scheduler") and scheduler != "constant":
        warnings.append(Problem(
            "lr_scheduler", scheduler,
            f"has no effect: --optimizer={name} is schedule-free and replaces the learning-rate schedule "
            "(its warmup comes from --lr_warmup_steps)",
        ))
    if scheduler == "constant" and not schedule_free and asks_for_something(cfg, "lr_warmup_steps"):
        warnings.append(Problem("lr_warmup_steps", setting(cfg, "lr_warmup_steps"),
                                "has no effect with --lr_scheduler=constant; use constant_with_warmup for a warmup"))
    # SimpleTuner hands these to a CPU-offloaded optimizer only (--optimizer_cpu_offload_method torchao),
    # and the option's one choice is none: they never change a run
    warnings += [Problem(option, True, "has no effect: it applies only to an optimizer offloaded to the CPU "
                                       "(--optimizer_cpu_offload_method), whose only choice is none")
                 for option in ("optimizer_offload_gradients", "fuse_optimizer") if asks_for_something(cfg, option)]
    if asks_for_something(cfg, "lr_scale_sqrt") and not setting(cfg, "lr_scale"):
        warnings.append(Problem("lr_scale_sqrt", True, "has no effect without --lr_scale"))
    if not setting(cfg, "use_ema"):
        warnings += [Problem(option, setting(cfg, option), "has no effect without --use_ema")
                     for option in _EMA_OPTIONS if asks_for_something(cfg, option)]
    elif setting(cfg, "ema_cpu_only") and setting(cfg, "ema_device") != "cpu":
        warnings.append(Problem("ema_cpu_only", True, "has no effect unless --ema_device=cpu"))
    return warnings
