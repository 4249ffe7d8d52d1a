"""Checkpoint save and resume for a run, modelled on torchtitan's ``CheckpointManager``.

The run registers what makes up its state — the trainable's weights, stateful objects written
once by the main process (optimizer, LR scheduler, EMA: anything with ``state_dict`` /
``load_state_dict``), and one per-process state (RNG, data position) — and the checkpointer
decides when a checkpoint is due, writes it atomically (``checkpoints.begin/finish_checkpoint``:
temp folder, manifest, rename, ``COMPLETE`` marker), prunes old ones and loads one back.
"""

from __future__ import annotations

import logging
import pickle
import random
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..config import ConfigError, Problem
from ..contract import CheckpointInfo, TrainerState
from . import checkpoints as ckpt

log = logging.getLogger(__name__)


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def capture_rng() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
def params_checksum(params: list[torch.Tensor]) -> list[float]:
    """Sum and sum of squares of the trained weights: equal on every process when DDP kept them in sync."""
    total = torch.zeros(2, dtype=torch.float64)
    for p in params:
        flat = p.detach().double()
        total += torch.stack([flat.sum(), (flat * flat).sum()]).cpu()
    return total.tolist()


class ProcessState:
    """One process's share of a checkpoint: global RNGs, the loop's generator, the data position."""

    def __init__(self, generator: torch.Generator, data: Any, params: list[torch.Tensor]):
        self.generator = generator
        self.data = data
        self.params = params

    def state_dict(self) -> dict[str, Any]:
        data_state = self.data.state_dict() if hasattr(self.data, "state_dict") else None
        return {"rng": capture_rng(), "generator": self.generator.get_state(), "data": data_state,
                "params_checksum": params_checksum(self.params)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_rng(state["rng"])
        self.generator.set_state(state["generator"])
        if state.get("data") is not None:
            self.data.load_state_dict(state["data"])


class Checkpointer:
    """Writes and loads the checkpoints of one run (every process calls every method)."""

    def __init__(self, cfg: Any, accelerator: Any, *, trainable: Any, states: dict[str, Stateful | None],
                 process_state: Stateful, training_state: ckpt.TrainingState, events: Any,
                 ema: Any = None):
        self.cfg = cfg
        self.acc = accelerator
        self.output_dir = Path(cfg.output_dir)
        self.trainable = trainable
        self.states = {name: s for name, s in states.items() if s is not None}
        self.process_state = process_state
        self.training_state = training_state
        self.events = events
        self.ema = ema
        self.rank = accelerator.process_index
        self.saved: list[Path] = []

    def due(self, step: int) -> str | None:
        """The kind of checkpoint due after optimizer step ``step`` (interval, rolling) or ``None``."""
        return ckpt.due_kind(step, step_interval=self.cfg.checkpoint_step_interval,
                             rolling_interval=self.cfg.checkpointing_rolling_steps)

    def save(self, kind: str) -> Path:
        """Write ``checkpoint-<step>`` (``kind``: interval, rolling, epoch, interrupt) and prune old ones."""
        started = time.monotonic()
        state = self.training_state
        step = state.global_step
        self.events.state(TrainerState.CHECKPOINTING, f"writing checkpoint-{step}")
        is_main = self.acc.is_main_process
        tmp = ckpt.begin_checkpoint(self.output_dir, step)
        if is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        self.acc.wait_for_everyone()
        state.kind = kind
        if is_main:
            title = f"{self.cfg.model_family} {self.cfg.model_type} step {step}"
            self.trainable.save(tmp, title=title, ema=self.ema)
            for name, stateful in self.states.items():
                ckpt.write_torch(tmp / f"{name}.pt", stateful.state_dict())
            (tmp / ckpt.STATE_FILE).write_text(state.to_json())
        ckpt.write_torch(tmp / f"rank-{self.rank}.pt", self.process_state.state_dict())
        self.acc.wait_for_everyone()
        final = ckpt.checkpoint_path(self.output_dir, step)
        if is_main:
            final = ckpt.finish_checkpoint(self.output_dir, step)
            ckpt.prune_checkpoints(self.output_dir, total_limit=self.cfg.checkpoints_total_limit,
                                   rolling_limit=self.cfg.checkpoints_rolling_total_limit, keep=final)
            self.events.checkpoint(CheckpointInfo(step=step, path=str(final), time=now_rfc3339()),
                                   seconds=time.monotonic() - started)
        self.acc.wait_for_everyone()
        self.saved.append(final)
        self.events.state(TrainerState.TRAINING, "")
        return final

    def load(self, folder: Path) -> ckpt.TrainingState:
        """Load weights, every registered state and this process's state; returns the saved position.

        Raises ConfigError naming the checkpoint when it cannot be loaded into this run (another
        model type or LoRA shape, unreadable files): retrying the same run cannot help.
        """
        try:
            saved = self._load(folder)
        except (OSError, ValueError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
            raise ConfigError([Problem("resume_from_checkpoint", self.cfg.resume_from_checkpoint,
                                       f"{folder} cannot be loaded into this run: {_reason(exc)}")]) from exc
        log.info("resumed from %s at step %d (epoch %d)", folder.name, saved.global_step, saved.epoch + 1)
        return saved

    def _load(self, folder: Path) -> ckpt.TrainingState:
        saved = ckpt.read_state(folder)
        if saved.model_type != self.cfg.model_type:
            raise ValueError(f"it is a {saved.model_type} checkpoint but model_type is {self.cfg.model_type}")
        self.trainable.load(folder)
        for name, stateful in self.states.items():
            path = folder / f"{name}.pt"
            if path.is_file():
                stateful.load_state_dict(ckpt.read_torch(path))
            elif name != "ema":  # a run may turn EMA on when it resumes
                raise FileNotFoundError(f"it has no {path.name}")
        rank_file = folder / f"rank-{self.rank}.pt"
        if not rank_file.is_file():
            log.warning("%s has no state for process %d (saved with %d processes); using process 0's",
                        folder.name, self.rank, saved.world_size)
            rank_file = folder / "rank-0.pt"
        self.process_state.load_state_dict(ckpt.read_torch(rank_file))
        state = self.training_state
        state.global_step, state.epoch = saved.global_step, saved.epoch
        state.batches_in_epoch, state.samples_seen = saved.batches_in_epoch, saved.samples_seen
        return saved


def _reason(exc: BaseException) -> str:
    """The first line of an exception's message (torch's load errors run to many lines)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
