"""One training run, start to finish: ``run(cfg) -> ExitCode``.

``run`` checks the configuration, starts the runtime (metrics, status, signals) and either
trains in this process (:func:`run_process`) or, with ``num_processes > 1`` or several machines,
has :mod:`.launcher` start one worker per rank.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, Problem, TrainerConfig
from .contract import ExitCode, TrainerState
from .events import NullEvents, TrainingEvents
from .launcher import NodePlacement, SignalStopEvents, in_distributed_env, launch_workers, node_placement

log = logging.getLogger(__name__)


def requested_processes(cfg: Any, environ: dict[str, str] | None = None) -> int:
    """``TRAINING_NUM_PROCESSES`` overrides ``--num_processes``."""
    env = os.environ if environ is None else environ
    raw = env.get("TRAINING_NUM_PROCESSES")
    if raw:
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError([Problem("num_processes", raw, "TRAINING_NUM_PROCESSES must be a whole number")]) from None
        if value < 1:
            raise ConfigError([Problem("num_processes", raw, "TRAINING_NUM_PROCESSES must be at least 1")])
        return value
    return int(cfg.num_processes)


@dataclass(frozen=True)
class StartPlan:
    """What the start-up checks decided: how many processes, and this node's place."""

    world: int
    placement: NodePlacement | None


def preflight(cfg: TrainerConfig, events: TrainingEvents | None = None) -> StartPlan | None:
    """Every check a start runs before loading anything; ``--print-config`` runs exactly this.

    Logs a warning for each option that has no effect as configured. On a configuration error
    logs the problems (and reports them to ``events``) and returns None: the caller exits 78.
    """
    from .training.preflight import all_warnings, check

    for warning in all_warnings(cfg):
        log.warning("%s", warning)
    try:
        check(cfg)
        world = requested_processes(cfg)
        placement = node_placement(world)
    except ConfigError as exc:
        log.error("configuration rejected:\n%s", exc)
        if events is not None:
            events.error(str(exc))
        return None
    return StartPlan(world, placement)


def run(cfg: TrainerConfig, events: TrainingEvents | None = None) -> ExitCode:
    """Train as configured. Returns SUCCESS, INTERRUPTED (checkpoint written) or CONFIG_ERROR."""
    plan = preflight(cfg, events)
    if plan is None:
        return ExitCode.CONFIG_ERROR
    world, placement = plan.world, plan.placement
    if events is None:
        external_rank = in_distributed_env() and int(os.environ.get("RANK", "0") or 0) != 0
        if external_rank or (placement is not None and placement.node_rank != 0):
            # only global rank 0's machine runs the runtime (its metrics port, trackers, hooks);
            # the other ranks/machines just obey stop signals
            return _dispatch(cfg, SignalStopEvents(), world, placement)
        with _runtime(cfg) as runtime_events:
            return _dispatch(cfg, runtime_events, world, placement)
    return _dispatch(cfg, events, world, placement)


def _dispatch(cfg: TrainerConfig, events: TrainingEvents, world: int,
              placement: NodePlacement | None = None) -> ExitCode:
    if in_distributed_env():
        return run_process(cfg, events)
    if placement is not None:
        return launch_workers(cfg, events, placement.per_node, placement=placement)
    if world > 1:
        return launch_workers(cfg, events, world)
    return run_process(cfg, events)


def _runtime(cfg: TrainerConfig):
    try:
        from .runtime import build_runtime
    except ImportError:  # the runtime is optional for in-process use
        from contextlib import nullcontext

        return nullcontext(NullEvents())
    return build_runtime(cfg)


def _seed(cfg: Any) -> int:
    return int(cfg.seed)


def run_process(cfg: TrainerConfig, events: TrainingEvents) -> ExitCode:
    """The training run of this process (one rank when distributed)."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import broadcast_object_list, set_seed

    from .acceleration import MemoryPlan
    from .collectives import process_group_kwargs
    from .models import load_family
    from .training.loop import TrainingLoop, weight_dtype_for
    from .training.precision import accelerator_kwargs_handlers, apply_tf32

    events.state(TrainerState.STARTING, "loading the model")
    try:
        use_cpu = not torch.cuda.is_available()
        # accelerate keeps its settings process-wide; a second run in this process may use others
        AcceleratorState._reset_state()
        apply_tf32(cfg)
        accelerator = Accelerator(mixed_precision=_mixed_precision(cfg), cpu=use_cpu,
                                  kwargs_handlers=[*process_group_kwargs(), *accelerator_kwargs_handlers(cfg)])
        rank, world = accelerator.process_index, accelerator.num_processes
        seeds = [_seed(cfg)]
        if world > 1:
            broadcast_object_list(seeds)
        seed = seeds[0]
        set_seed(seed + rank if cfg.seed_for_each_device else seed)
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        resume = _resume_checkpoint(cfg, accelerator)  # before the model loads: a bad one is refused at once

        family = load_family(cfg, device=accelerator.device, weight_dtype=weight_dtype_for(cfg))
        events.state(TrainerState.CACHING, "preparing datasets and caches")
        memory = MemoryPlan(cfg, family, accelerator.device)
        memory.before_caching()
        data = build_data(cfg, family, rank=rank, world=world, encoders=memory.encoders(family.encoders()))
        memory.after_caching()
        # every process decides when; the main one renders (and scores)
        validator = build_validator(cfg, family, main_process=accelerator.is_main_process)
        if cfg.delete_model_after_load and accelerator.is_local_main_process:
            _delete_cached_model(cfg, family, validator)

        loop = TrainingLoop(cfg, accelerator, family, data, events, validator=validator, seed=seed, memory=memory)
        result = loop.run(resume)
        if result.exit_code == ExitCode.SUCCESS:
            events.state(TrainerState.FINISHED, f"saved the model to {result.final_path}")
        else:
            events.state(TrainerState.TRAINING, "stopped on request after checkpointing")
        accelerator.end_training()
        return result.exit_code
    except ConfigError as exc:
        events.error(str(exc))
        return ExitCode.CONFIG_ERROR
    except Exception as exc:
        events.error(f"{type(exc).__name__}: {exc}")
        events.state(TrainerState.FAILED, str(exc))
        raise


def _delete_cached_model(cfg: TrainerConfig, family: Any, validator: Any) -> None:
    """``--delete_model_after_load``, once the caches are built (see :mod:`.acceleration.hubcache`)."""
    from .acceleration.hubcache import delete_cached_model, kept_folders

    validating = validator is not None and bool(getattr(validator, "enabled", False))
    delete_cached_model(family.components.source.model, kept_folders(cfg, family, validating=validating))


def _resume_checkpoint(cfg: TrainerConfig, accelerator: Any) -> Path | None:
    """The checkpoint to resume from (the main process decides, every process gets its answer).

    Raises ConfigError on every process when an explicitly named checkpoint is missing or broken.
    """
    from accelerate.utils import broadcast_object_list

    from .training import checkpoints as ckpt

    answer: list[Any] = [None, None]  # folder, problems
    if accelerator.is_main_process:
        try:
            found = ckpt.find_resume_checkpoint(Path(cfg.output_dir), cfg.resume_from_checkpoint)
            answer = [str(found) if found else None, None]
        except ConfigError as exc:
            answer = [None, exc.problems]
    if accelerator.num_processes > 1:
        broadcast_object_list(answer)
    if answer[1]:
        raise ConfigError(answer[1])
    return Path(answer[0]) if answer[0] else None


def _mixed_precision(cfg: Any) -> str:
    return cfg.mixed_precision


def build_data(cfg: Any, family: Any, *, rank: int, world: int, encoders: Any = None) -> Any:
    """This rank's batch source; ``encoders`` (default: the family's) encode what the caches lack."""
    from .data import build_training_data

    return build_training_data(cfg, encoders or family.encoders(), rank=rank, world_size=world)


def build_validator(cfg: Any, family: Any, *, main_process: bool = True) -> Any:
    """The runtime's validation renderer when it is available and validation is configured.

    On the main process, when its renders are scored (``--evaluation_type clip``), the CLIP model is loaded
    here, before training: a missing or unreachable one is a ConfigError (exit 78).
    """
    try:
        from .runtime.clip_evaluation import load_scorer
        from .runtime.validation import Validator
    except ImportError:
        return None
    validator = Validator(cfg, family, Path(cfg.output_dir))
    if main_process and validator.renders:
        validator.scorer = load_scorer(cfg)
    return validator
