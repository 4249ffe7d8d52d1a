"""Starting one worker process per rank, on one machine or as this machine's share of several.

With ``num_processes > 1`` (or ``TRAINING_NUM_PROCESSES``) and no distributed environment yet,
:func:`launch_workers` spawns one worker per rank (with ``RANK``/``WORLD_SIZE``/``MASTER_*`` set,
so accelerate sets up DDP — NCCL on GPUs, gloo on CPU); each runs
:func:`kubetuner_trainer.train.run_process`. The parent keeps the runtime (metrics, status,
signals): rank 0 forwards its events over a queue, and a stop request reaches every worker
through a shared flag.

Several machines (``NUM_NODES`` > 1, ``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` in the
environment; ``num_processes`` counts the processes of all machines): each machine's
``kubetuner-train`` starts its ``num_processes / NUM_NODES`` local workers as global ranks
``NODE_RANK * per_node + local_rank`` and joins the others at the given address. Only node 0 runs
the runtime; the exit code of every node still follows the contract.
"""

from __future__ import annotations

import logging
import os
import queue as queue_mod
import signal
import socket
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, Problem, TrainerConfig
from .contract import ExitCode, TrainerState
from .events import NullEvents, TrainingEvents

log = logging.getLogger(__name__)

_CLEAN_EXITS = (int(ExitCode.SUCCESS), int(ExitCode.INTERRUPTED), int(ExitCode.CONFIG_ERROR))


def in_distributed_env(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return int(env.get("WORLD_SIZE", "1") or 1) > 1


@dataclass(frozen=True)
class NodePlacement:
    """This machine's share of a multi-machine run."""

    num_nodes: int
    node_rank: int
    per_node: int
    master_addr: str
    master_port: int

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.per_node

    def global_rank(self, local_rank: int) -> int:
        return self.node_rank * self.per_node + local_rank


def _env_int(env: dict[str, str] | Any, name: str, *, minimum: int, maximum: int | None = None) -> int:
    raw = env.get(name, "")
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < minimum or (maximum is not None and value > maximum):
        upper = f" and at most {maximum}" if maximum is not None else ""
        raise ConfigError([Problem(name, raw, f"environment variable {name} must be a whole number "
                                              f"of at least {minimum}{upper}")])
    return value


def node_placement(total: int, environ: dict[str, str] | None = None) -> NodePlacement | None:
    """The multi-machine layout from ``NUM_NODES``/``NODE_RANK``/``MASTER_ADDR``/``MASTER_PORT``.

    ``None`` for a single machine (``NUM_NODES`` unset or 1) or when this process already is one
    rank of a launched world (``WORLD_SIZE`` > 1). ``total`` is ``num_processes``, counted over
    all machines; it must split evenly. ``NODE_RANK`` falls back to Kubernetes'
    ``JOB_COMPLETION_INDEX``; ``NPROC_PER_NODE``, when set, must agree.
    """
    env = os.environ if environ is None else environ
    if in_distributed_env(env) or not env.get("NUM_NODES"):
        return None
    nodes = _env_int(env, "NUM_NODES", minimum=1)
    if nodes == 1:
        return None
    if total % nodes:
        raise ConfigError([Problem("num_processes", total,
                                   f"counts the processes of all machines, so it must be a multiple of "
                                   f"NUM_NODES={nodes} (for example {nodes * max(1, total // nodes)})")])
    per_node = total // nodes
    if env.get("NPROC_PER_NODE") and _env_int(env, "NPROC_PER_NODE", minimum=1) != per_node:
        raise ConfigError([Problem("num_processes", total,
                                   f"gives {per_node} processes per machine with NUM_NODES={nodes}, but "
                                   f"NPROC_PER_NODE={env['NPROC_PER_NODE']}; set num_processes to "
                                   f"NUM_NODES x NPROC_PER_NODE")])
    rank_var = "NODE_RANK" if env.get("NODE_RANK") else "JOB_COMPLETION_INDEX"
    node_rank = _env_int(env, rank_var, minimum=0, maximum=nodes - 1)
    master_addr = env.get("MASTER_ADDR", "").strip()
    if not master_addr:
        raise ConfigError([Problem("MASTER_ADDR", "", "environment variable MASTER_ADDR must name the host "
                                                      "of node 0 when NUM_NODES > 1")])
    port = _env_int(env, "MASTER_PORT", minimum=1, maximum=65535)
    return NodePlacement(nodes, node_rank, per_node, master_addr, port)


class SignalStopEvents(NullEvents):
    """Reports nowhere; SIGTERM/SIGINT turn into a stop request (checkpoint, exit 75)."""

    def __init__(self) -> None:
        self._signalled = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signalled = True

    def stop_requested(self) -> bool:
        return self._signalled

    def error(self, message: str) -> None:
        log.error("%s", message)  # no runtime reports it on this machine: the pod log must show it


class QueueEvents:
    """Forwards a worker's events to the parent; stop requests come back through a shared flag."""

    def __init__(self, queue: Any, stop_flag: Any, *, forward: bool):
        self._queue = queue
        self._stop = stop_flag
        self._forward = forward
        self._signalled = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signalled = True

    def _send(self, kind: str, *args: Any, **kwargs: Any) -> None:
        if self._forward:
            self._queue.put((kind, args, kwargs))

    def state(self, state: TrainerState, message: str = "") -> None:
        self._send("state", state, message)

    def step(self, report: Any) -> None:
        self._send("step", report)

    def checkpoint(self, info: Any, *, seconds: float) -> None:
        self._send("checkpoint", info, seconds=seconds)

    def validation(self, step: int, images: list[Path], *, seconds: float,
                   scores: dict[str, float] | None = None) -> None:
        extra = {"scores": scores} if scores else {}  # event sinks that predate CLIP scores take none
        self._send("validation", step, images, seconds=seconds, **extra)

    def error(self, message: str) -> None:
        self._queue.put(("error", (message,), {}))

    def stop_requested(self) -> bool:
        return self._signalled or self._stop.is_set()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(values: dict[str, Any], env_settings: Any, rank: int, rank_env: dict[str, str],
            queue: Any, stop_flag: Any) -> None:
    from .train import run_process

    os.environ.update(rank_env)
    code = 1
    try:
        cfg = TrainerConfig.from_mapping(values, require=False, env=env_settings)
        events = QueueEvents(queue, stop_flag, forward=rank == 0)
        code = int(run_process(cfg, events))
    except BaseException:
        queue.put(("error", (f"process {rank} failed:\n{traceback.format_exc()}",), {}))
        code = 1
    finally:
        queue.put(("exit", (rank, code), {}))


def rank_environment(local_rank: int, local_world: int, placement: NodePlacement | None,
                     port: int | None = None) -> dict[str, str]:
    """The torch.distributed variables of one worker (on one machine, or on one of several)."""
    if placement is None:
        assert port is not None
        addr, global_rank, world, node_rank = "127.0.0.1", local_rank, local_world, 0
    else:
        addr, port = placement.master_addr, placement.master_port
        global_rank, world, node_rank = placement.global_rank(local_rank), placement.world_size, placement.node_rank
    return {"MASTER_ADDR": addr, "MASTER_PORT": str(port), "RANK": str(global_rank),
            "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(local_world),
            "GROUP_RANK": str(node_rank), "NODE_RANK": str(node_rank)}


def combined_exit_code(codes: list[int]) -> int:
    """One exit code for a machine's workers: a config error wins (permanent, and peers torn down
    because of it fail too), then any crash, then "interrupted", then success."""
    if int(ExitCode.CONFIG_ERROR) in codes:
        return int(ExitCode.CONFIG_ERROR)
    return max(codes, key=lambda c: (c not in _CLEAN_EXITS, c))


def launch_workers(cfg: TrainerConfig, events: TrainingEvents, world: int, *,
                   placement: NodePlacement | None = None) -> ExitCode:
    """Spawn ``world`` local ranks, relay their events, forward stop requests; the worst exit code wins.

    With ``placement`` they are this machine's ranks of a multi-machine world; their events are
    relayed only on node 0 (global rank 0), errors always.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    stop_flag = ctx.Event()
    port = None if placement is not None else _free_port()
    values = cfg.to_dict(only_set=True)  # workers must see the same "set by the user" as this process
    procs = []
    for r in range(world):
        rank_env = rank_environment(r, world, placement, port)
        procs.append(ctx.Process(target=_worker, args=(values, cfg.env, int(rank_env["RANK"]), rank_env,
                                                       queue, stop_flag), daemon=False))
    first_rank = placement.global_rank(0) if placement is not None else 0
    for p in procs:
        p.start()
    codes: dict[int, int] = {}  # by local rank
    errors: list[str] = []

    def failed() -> bool:
        # a crash or a config error leaves the other ranks waiting in a collective for ever
        return any(c not in _CLEAN_EXITS or c == ExitCode.CONFIG_ERROR for c in codes.values())

    try:
        while len(codes) < world and not failed():
            if events.stop_requested():
                stop_flag.set()
            try:
                kind, args, kwargs = queue.get(timeout=0.5)
            except queue_mod.Empty:
                for r, proc in enumerate(procs):
                    if r not in codes and not proc.is_alive():
                        proc.join(timeout=1)
                        codes[r] = proc.exitcode if proc.exitcode is not None else 1
                        if codes[r] not in _CLEAN_EXITS:
                            errors.append(f"process {first_rank + r} died with exit code {codes[r]}")
                continue
            if kind == "exit":
                codes[args[0] - first_rank] = args[1]
            elif kind == "error":
                errors.append(args[0])
                events.error(args[0])
            else:
                getattr(events, kind)(*args, **kwargs)
    finally:
        if failed() or len(codes) < world:
            # end the ranks that are left (SIGTERM first, which a worker treats as a stop request;
            # SIGKILL if it is stuck)
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
            for proc in procs:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
        for proc in procs:
            proc.join(timeout=60)
        while True:  # collect what the workers said last (their tracebacks)
            try:
                kind, args, _kwargs = queue.get(timeout=0.2)
            except queue_mod.Empty:
                break
            if kind == "error" and args[0] not in errors:
                errors.append(args[0])
            elif kind == "exit":
                codes.setdefault(args[0] - first_rank, args[1])
        for r, proc in enumerate(procs):  # a rank killed before it could report
            codes.setdefault(r, proc.exitcode if proc.exitcode is not None else 1)
    worst = combined_exit_code(list(codes.values()))
    if worst not in _CLEAN_EXITS:
        raise RuntimeError("distributed training failed:\n" + "\n".join(errors))
    return ExitCode(worst)
