"""The training loop on accelerate: forward, loss, accumulation, clipping, EMA, checkpoints, stop.

The data source is injected (anything iterable of batches with ``steps_per_epoch`` and
``state_dict``/``load_state_dict``), as are the model adapter and the event sink, so the loop
is the same for the CLI, tests and the benchmark.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..contract import CheckpointInfo, ExitCode, TrainerState
from ..events import NullEvents, StepReport, TrainingEvents
from . import checkpoints as ckpt
from .evaluation import build_evaluator, plan_eval_schedule
from .lora import attach_lora, load_lora_into, lora_adapter_metadata, lora_state_dicts
from .losses import input_perturbation_scale, offset_noise, training_loss
from .timesteps import TimestepSampler

log = logging.getLogger(__name__)


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def weight_dtype_for(cfg: Any) -> torch.dtype:
    """Frozen base weights follow ``--mixed_precision`` for LoRA; full fine-tuning keeps fp32 masters."""
    if cfg.model_type == "full":
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision or "no", torch.float32)


@dataclass
class Schedule:
    """How long the run is, in optimizer steps and epochs."""

    batches_per_epoch: int
    updates_per_epoch: int
    max_steps: int
    max_epochs: int | None


def plan_schedule(cfg: Any, batches_per_epoch: int) -> Schedule:
    """Resolve ``--max_train_steps``/``--num_train_epochs``/``--ignore_final_epochs`` into numbers."""
    if batches_per_epoch <= 0:
        raise ValueError("the dataset yields no batches; check data_backend_config and train_batch_size")
    accum = cfg.gradient_accumulation_steps or 1
    updates = max(1, math.ceil(batches_per_epoch / accum))
    epochs = cfg.num_train_epochs or 0
    steps = cfg.max_train_steps or 0
    if steps <= 0 and epochs <= 0:
        raise ValueError("set max_train_steps or num_train_epochs to a positive number")
    if cfg.ignore_final_epochs:
        if steps <= 0:
            raise ValueError("ignore_final_epochs needs max_train_steps")
        return Schedule(batches_per_epoch, updates, steps, None)
    if steps <= 0:
        steps = epochs * updates
    elif epochs > 0:
        steps = min(steps, epochs * updates)
    max_epochs = epochs if epochs > 0 else math.ceil(steps / updates)
    return Schedule(batches_per_epoch, updates, steps, max_epochs)


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


def _optim_api():
    from .. import optim

    return optim


@dataclass
class LoopResult:
    exit_code: ExitCode
    state: ckpt.TrainingState
    final_path: Path | None = None
    checkpoints: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    eval_losses: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> evaluation components


class TrainingLoop:
    """One training run. ``run()`` returns a :class:`LoopResult`."""

    def __init__(self, cfg: Any, accelerator: Any, adapter: Any, data: Any,
                 events: TrainingEvents | None = None, *, validator: Any = None, seed: int = 0):
        self.cfg = cfg
        self.acc = accelerator
        self.adapter = adapter
        self.data = data
        self.events = events or NullEvents()
        self.validator = validator
        self.seed = seed
        self.output_dir = Path(cfg.output_dir)
        self.device = accelerator.device
        self.rank = accelerator.process_index
        self.world = accelerator.num_processes
        self.is_main = accelerator.is_main_process
        self.state = ckpt.TrainingState(world_size=self.world, model_type=cfg.model_type,
                                        model_family=cfg.model_family)
        self.generator = torch.Generator().manual_seed(seed + self.rank)
        self.trained: dict[str, torch.nn.Module] = {}
        self.wrapped: dict[str, torch.nn.Module] = {}
        self.ema = None
        self.result = LoopResult(ExitCode.SUCCESS, self.state)
        self._validated_step: int | None = None

    # ----- setup -----------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, adapter = self.cfg, self.adapter
        if cfg.model_type == "lora":
            self.trained = attach_lora(adapter, cfg)
        else:
            adapter.unet.requires_grad_(True)
            self.trained = {"unet": adapter.unet}
            if cfg.train_text_encoder:
                for name, te in zip(adapter.text_encoder_names, adapter.text_encoders, strict=True):
                    te.requires_grad_(True)
                    self.trained[name] = te
        for module in self.trained.values():
            module.train()
        if cfg.gradient_checkpointing:
            adapter.unet.enable_gradient_checkpointing()
            for name, module in self.trained.items():
                if name != "unet" and hasattr(module, "gradient_checkpointing_enable"):
                    module.gradient_checkpointing_enable()

        optim = _optim_api()
        groups = []
        for name, module in self.trained.items():
            params = [p for p in module.parameters() if p.requires_grad]
            group: dict[str, Any] = {"params": params, "name": "unet" if name == "unet" else "text_encoder"}
            lr = cfg.text_encoder_lr if name != "unet" and cfg.text_encoder_lr is not None else cfg.learning_rate
            if lr is not None:
                group["lr"] = lr
            groups.append(group)
        self.params = [p for g in groups for p in g["params"]]
        self.schedule = plan_schedule(cfg, self.data.steps_per_epoch)
        optimizer = optim.build_optimizer(cfg, groups)
        self.lr_scheduler = optim.build_lr_scheduler(cfg, optimizer, self.schedule.max_steps)
        # EMA follows the UNet's trained weights (text encoders train without one)
        self.ema_params = [p for p in self.trained["unet"].parameters() if p.requires_grad]
        if cfg.use_ema:
            self.ema = optim.EMAModel(self.ema_params, cfg)
        names = list(self.trained)
        prepared = self.acc.prepare(*[self.trained[n] for n in names], optimizer)
        *modules, self.optimizer = prepared if isinstance(prepared, (list, tuple)) else (prepared,)
        self.wrapped = dict(zip(names, modules, strict=True))
        self.timesteps = TimestepSampler(cfg, adapter.noise_scheduler.config.num_train_timesteps)
        self.alphas_cumprod = adapter.noise_scheduler.alphas_cumprod.to(self.device)
        self.evaluator = build_evaluator(cfg, self.data, seed=self.seed, device=self.device,
                                         num_train_timesteps=adapter.noise_scheduler.config.num_train_timesteps)
        self.eval_schedule = plan_eval_schedule(cfg, self.schedule.updates_per_epoch) if self.evaluator else None

    # ----- resume ----------------------------------------------------------------------------
    def resume(self, folder: Path) -> None:
        """Load weights, optimizer, scheduler, EMA, RNG and data position from a checkpoint."""
        state = ckpt.read_state(folder)
        if state.model_type != self.cfg.model_type:
            raise ValueError(f"checkpoint {folder} is a {state.model_type} checkpoint but model_type is "
                             f"{self.cfg.model_type}")
        self._load_weights(folder)
        self.optimizer.load_state_dict(ckpt.read_torch(folder / "optimizer.pt"))
        self.lr_scheduler.load_state_dict(ckpt.read_torch(folder / "scheduler.pt"))
        if self.ema is not None and (folder / "ema.pt").is_file():
            self.ema.load_state_dict(ckpt.read_torch(folder / "ema.pt"))
        rank_file = folder / f"rank-{self.rank}.pt"
        if not rank_file.is_file():
            log.warning("%s has no state for process %d (saved with %d processes); using process 0's",
                        folder.name, self.rank, state.world_size)
            rank_file = folder / "rank-0.pt"
        per_rank = ckpt.read_torch(rank_file)
        restore_rng(per_rank["rng"])
        self.generator.set_state(per_rank["generator"])
        if per_rank.get("data") is not None:
            self.data.load_state_dict(per_rank["data"])
        self.state.global_step = state.global_step
        self.state.epoch = state.epoch
        self.state.batches_in_epoch = state.batches_in_epoch
        self.state.samples_seen = state.samples_seen
        log.info("resumed from %s at step %d (epoch %d)", folder.name, state.global_step, state.epoch + 1)

    def _load_weights(self, folder: Path) -> None:
        if self.cfg.model_type == "lora":
            load_lora_into(self.adapter, self.trained, folder / ckpt.LORA_FILE)
            return
        for name, module in self.trained.items():
            result = module.load_state_dict(ckpt.load_safetensors_folder(folder / name), strict=False)
            params = {n for n, _ in module.named_parameters()}
            missing = [k for k in result.missing_keys if k in params]  # buffers may be left out on save
            if missing or result.unexpected_keys:
                raise ValueError(f"{folder / name} does not fit the {name}: missing {missing[:5]}, "
                                 f"unexpected {list(result.unexpected_keys)[:5]}")

    # ----- checkpoint writing ------------------------------------------------------------------
    def save_checkpoint(self, kind: str) -> Path:
        started = time.monotonic()
        self.events.state(TrainerState.CHECKPOINTING, f"writing checkpoint-{self.state.global_step}")
        step = self.state.global_step
        tmp = ckpt.begin_checkpoint(self.output_dir, step)
        if self.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        self.acc.wait_for_everyone()
        self.state.kind = kind
        if self.is_main:
            self._write_weights(tmp)
            ckpt.write_torch(tmp / "optimizer.pt", self.optimizer.state_dict())
            ckpt.write_torch(tmp / "scheduler.pt", self.lr_scheduler.state_dict())
            if self.ema is not None:
                ckpt.write_torch(tmp / "ema.pt", self.ema.state_dict())
            (tmp / ckpt.STATE_FILE).write_text(self.state.to_json())
        data_state = self.data.state_dict() if hasattr(self.data, "state_dict") else None
        ckpt.write_torch(tmp / f"rank-{self.rank}.pt", {
            "rng": capture_rng(), "generator": self.generator.get_state(), "data": data_state,
            "params_checksum": params_checksum(self.params),
        })
        self.acc.wait_for_everyone()
        final = ckpt.checkpoint_path(self.output_dir, step)
        if self.is_main:
            final = ckpt.finish_checkpoint(self.output_dir, step)
            ckpt.prune_checkpoints(self.output_dir, total_limit=self.cfg.checkpoints_total_limit,
                                   rolling_limit=self.cfg.checkpoints_rolling_total_limit, keep=final)
            self.events.checkpoint(CheckpointInfo(step=step, path=str(final), time=now_rfc3339()),
                                   seconds=time.monotonic() - started)
        self.acc.wait_for_everyone()
        self.result.checkpoints.append(final)
        self.events.state(TrainerState.TRAINING, "")
        return final

    def _write_weights(self, folder: Path) -> None:
        title = f"{self.cfg.model_family} {self.cfg.model_type} step {self.state.global_step}"
        if self.cfg.model_type == "lora":
            self._write_lora(folder, title)
            return
        for name, module in self.trained.items():
            module.save_pretrained(folder / name, safe_serialization=True)
        if self.ema is not None:
            ema_unet = self._ema_copy()
            ema_unet.save_pretrained(folder / "unet_ema", safe_serialization=True)

    def _write_lora(self, folder: Path, title: str) -> None:
        meta = ckpt.modelspec_metadata(self.cfg, title=title, lora=True)
        ckpt.save_lora_file(folder, self.adapter, lora_state_dicts(self.trained),
                            lora_adapter_metadata(self.trained),
                            lora_format=self.cfg.lora_format or "diffusers", metadata=meta)

    def _ema_copy(self) -> torch.nn.Module:
        """A CPU copy of the UNet carrying the EMA weights (training weights untouched)."""
        unet = copy.deepcopy(self.trained["unet"]).to("cpu")
        unet_params = [p for p in unet.parameters() if p.requires_grad]
        self.ema.copy_to(unet_params)
        return unet

    # ----- the step ----------------------------------------------------------------------------
    def _text(self, batch: Any) -> dict[str, torch.Tensor]:
        """Conditioning for a batch: cached embeddings, or live encoding when a text encoder trains.

        Caption dropout already happened in the data pipeline (dropped captions arrive as "").
        """
        if self.cfg.train_text_encoder:
            tes = [self.wrapped.get(n, te) for n, te in zip(self.adapter.text_encoder_names,
                                                              self.adapter.text_encoders, strict=True)]
            return self.adapter.encode_text(list(batch.captions), text_encoders=tes)
        return {k: v.to(self.device) for k, v in batch.text.items()}

    def compute_loss(self, batch: Any) -> torch.Tensor:
        cfg, adapter = self.cfg, self.adapter
        latents = batch.latents.to(self.device, dtype=torch.float32)
        bsz = latents.shape[0]
        noise = torch.randn(latents.shape, generator=self.generator).to(self.device)
        noise = offset_noise(cfg, noise.cpu(), self.generator).to(self.device) if cfg.noise_offset else noise
        timesteps = self.timesteps(bsz, self.generator).to(self.device)
        model_noise = noise
        scale = input_perturbation_scale(cfg, self.state.global_step)
        if scale:
            model_noise = noise + scale * torch.randn(latents.shape, generator=self.generator).to(self.device)
        noisy = adapter.noise_scheduler.add_noise(latents, model_noise, timesteps)
        mask = getattr(batch, "masks", None)
        if mask is not None:
            prob = 1.0 if cfg.masked_loss_probability is None else cfg.masked_loss_probability
            if prob < 1.0 and torch.rand(1, generator=self.generator).item() >= prob:
                mask = None
        with self.acc.autocast():
            text = self._text(batch)
            pred = adapter.predict(self.wrapped["unet"], noisy, timesteps, text, batch)
        target = adapter.target(latents, noise, timesteps)
        return training_loss(cfg, pred, target, timesteps, alphas_cumprod=self.alphas_cumprod,
                             num_train_timesteps=adapter.noise_scheduler.config.num_train_timesteps,
                             prediction_type=adapter.prediction_type, mask=mask)

    def _clip(self) -> float | None:
        limit = self.cfg.max_grad_norm
        if not limit:
            return None
        if (self.cfg.grad_clip_method or "value") == "norm":
            return float(self.acc.clip_grad_norm_(self.params, limit))
        self.acc.clip_grad_value_(self.params, limit)
        return None

    def _stop_agreed(self) -> bool:
        """Every process stops at the same step when any of them was asked to."""
        flag = torch.tensor([1.0 if self.events.stop_requested() else 0.0], device=self.device)
        if self.world > 1:
            flag = self.acc.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)

    def _report(self, loss: float, grad_norm: float | None, step_seconds: float, data_wait: float,
                components: dict[str, float] | None = None) -> None:
        lrs = {}
        for group in self.optimizer.param_groups:
            lrs[group.get("name", f"group{len(lrs)}")] = float(group["lr"])
        samples = (self.cfg.train_batch_size or 1) * (self.cfg.gradient_accumulation_steps or 1) * self.world
        mem = peak = None
        if torch.cuda.is_available() and self.device.type == "cuda":
            mem, peak = torch.cuda.memory_allocated(self.device), torch.cuda.max_memory_allocated(self.device)
        self.events.step(StepReport(
            step=self.state.global_step, max_steps=self.schedule.max_steps, epoch=self.state.epoch + 1,
            max_epochs=self.schedule.max_epochs, loss=loss, loss_components=dict(components or {}),
            learning_rates=lrs,
            samples_per_second=samples / step_seconds if step_seconds > 0 else None,
            seconds_per_step=step_seconds, data_wait_seconds=data_wait, grad_norm=grad_norm,
            gpu_memory_allocated_bytes=mem, gpu_memory_peak_bytes=peak,
        ))

    def _validate(self, epoch_end: bool, *, startup: bool = False) -> None:
        """Render validation images when due (every process decides alike; the main one renders)."""
        v = self.validator
        if v is None:
            return
        if startup:
            due = v.due_on_startup()
        else:
            due = v.due(self.state.global_step, epoch_end, self.state.epoch if epoch_end else None)
        if not due or self._validated_step == self.state.global_step:
            return
        self._validated_step = self.state.global_step
        if self.is_main:
            unwrapped = {n: self.acc.unwrap_model(m) for n, m in self.wrapped.items()}
            tes = [unwrapped.get(n, te) for n, te in zip(self.adapter.text_encoder_names,
                                                           self.adapter.text_encoders, strict=True)]
            for module in unwrapped.values():
                module.eval()
            _optim_api().optimizer_eval_mode(self.optimizer)
            ema_factory = None
            if self.ema is not None:
                ema_factory = lambda: self.adapter.build_pipeline(  # noqa: E731
                    unet=self._ema_copy().to(self.device), text_encoders=tes)
            try:
                v.run_and_report(
                    self.state.global_step, self.events,
                    lambda: self.adapter.build_pipeline(unet=unwrapped["unet"], text_encoders=tes),
                    ema_pipeline_factory=ema_factory,
                )
            finally:
                _optim_api().optimizer_train_mode(self.optimizer)
                for module in unwrapped.values():
                    module.train()
        self.acc.wait_for_everyone()

    def _end_of_epoch(self, batch: Any) -> bool:
        position = getattr(batch, "position", None)
        if position is None:
            return self.state.batches_in_epoch >= self.schedule.batches_per_epoch
        return position + 1 >= self.schedule.batches_per_epoch

    def run(self, resume_from: Path | None = None) -> LoopResult:
        """Train until max steps/epochs or a stop request; write the final model on success.

        The data source is iterated once and yields batches endlessly, epoch after epoch
        (``batch.epoch``/``batch.position`` say where each batch sits).
        """
        self.setup()
        if resume_from is not None:
            self.resume(resume_from)
        cfg, sched = self.cfg, self.schedule
        accum = cfg.gradient_accumulation_steps or 1
        optim = _optim_api()
        optim.optimizer_train_mode(self.optimizer)
        self.events.state(TrainerState.TRAINING, f"training to step {sched.max_steps}")
        set_to_none = bool(cfg.set_grads_to_none)
        self.optimizer.zero_grad(set_to_none=set_to_none)
        stopped = False
        micro, losses, step_started = 0, [], time.monotonic()
        wait_before = float(getattr(self.data, "data_wait_seconds", 0.0) or 0.0)
        batches = iter(self.data)
        if resume_from is None:
            self._validate(False, startup=True)
        while self.state.global_step < sched.max_steps and not self._epochs_done():
            batch = next(batches)
            if getattr(batch, "epoch", None) is not None and batch.epoch != self.state.epoch:
                self.state.epoch, self.state.batches_in_epoch = int(batch.epoch), 0
            micro += 1
            end_of_epoch = self._end_of_epoch(batch)
            sync = micro % accum == 0 or end_of_epoch  # a short last group is scaled alike
            with contextlib.ExitStack() as stack:
                if not sync and self.world > 1:
                    for module in self.wrapped.values():
                        stack.enter_context(self.acc.no_sync(module))
                loss = self.compute_loss(batch)
                self.acc.backward(loss / accum)
            losses.append(loss.detach())
            self.state.batches_in_epoch += 1
            self.state.samples_seen += batch.latents.shape[0] * self.world
            if sync:
                self._optimizer_step(losses, step_started, wait_before)
                micro, losses = 0, []
                done = self.state.global_step >= sched.max_steps
                if self._stop_agreed() and not done:
                    self.save_checkpoint("interrupt")
                    stopped = True
                    break
                kind = ckpt.due_kind(self.state.global_step, step_interval=cfg.checkpoint_step_interval,
                                     rolling_interval=cfg.checkpointing_rolling_steps)
                if kind and not done:
                    self.save_checkpoint(kind)
                self._validate(epoch_end=False)
                # checkpoint and validation time is not part of the next step's timing
                step_started = time.monotonic()
                wait_before = float(getattr(self.data, "data_wait_seconds", 0.0) or 0.0)
            if end_of_epoch:
                self.state.epoch += 1
                self.state.batches_in_epoch = 0
                if self.state.global_step < sched.max_steps and not self._epochs_done():
                    if cfg.checkpoint_epoch_interval and self.state.epoch % cfg.checkpoint_epoch_interval == 0:
                        self.save_checkpoint("epoch")
                    self._validate(epoch_end=True)
                    step_started = time.monotonic()
        if hasattr(self.data, "close"):
            self.data.close()
        if stopped:
            self.result.exit_code = ExitCode.INTERRUPTED
            return self.result
        self.result.final_path = self.save_final()
        return self.result

    def _epochs_done(self) -> bool:
        return self.schedule.max_epochs is not None and self.state.epoch >= self.schedule.max_epochs

    def _optimizer_step(self, losses: list[torch.Tensor], step_started: float, wait_before: float) -> None:
        grad_norm = self._clip()
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=bool(self.cfg.set_grads_to_none))
        self.state.global_step += 1
        if self.ema is not None:
            self.ema.step(self.ema_params)
        mean = torch.stack(losses).float().mean().reshape(1)  # one device sync per optimizer step
        if self.world > 1:
            mean = self.acc.reduce(mean, reduction="mean")
        mean_loss = float(mean.item())
        self.result.losses.append(mean_loss)
        wait_now = float(getattr(self.data, "data_wait_seconds", 0.0) or 0.0)
        seconds = time.monotonic() - step_started
        components = self._evaluate()  # every process takes part (the loss sums are all-reduced)
        if self.is_main:
            self._report(mean_loss, grad_norm, seconds, wait_now - wait_before, components)

    def _evaluate(self) -> dict[str, float]:
        """The evaluation loss components when an evaluation is due after this step, else ``{}``."""
        if self.evaluator is None or not self.eval_schedule.due(self.state.global_step):
            return {}
        unwrapped = {n: self.acc.unwrap_model(m) for n, m in self.wrapped.items()}  # no DDP collectives
        tes = [unwrapped.get(n, te) for n, te in zip(self.adapter.text_encoder_names, self.adapter.text_encoders,
                                                       strict=True)]

        def predict(batch: Any, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            with self.acc.autocast():
                if self.cfg.train_text_encoder:
                    text = self.adapter.encode_text(list(batch.captions), text_encoders=tes)
                else:
                    text = {k: v.to(self.device) for k, v in batch.text.items()}
                return self.adapter.predict(unwrapped["unet"], noisy, timesteps, text, batch)

        for module in unwrapped.values():
            module.eval()  # no dropout: the same weights give the same loss
        _optim_api().optimizer_eval_mode(self.optimizer)
        try:
            reduce = (lambda t: self.acc.reduce(t, reduction="sum")) if self.world > 1 else None
            components = self.evaluator.evaluate(predict, self.adapter.target,
                                                 self.adapter.noise_scheduler.add_noise, reduce)
        finally:
            _optim_api().optimizer_train_mode(self.optimizer)
            for module in unwrapped.values():
                module.train()
        self.result.eval_losses[self.state.global_step] = components
        log.info("step %d: evaluation loss %.6f", self.state.global_step, components["eval_loss"])
        return components

    # ----- the final model --------------------------------------------------------------------
    def save_final(self) -> Path:
        """The trained result in diffusers layout in ``output_dir`` (LoRA file, or a full pipeline)."""
        _optim_api().optimizer_eval_mode(self.optimizer)
        self.acc.wait_for_everyone()
        out = self.output_dir
        if self.is_main:
            out.mkdir(parents=True, exist_ok=True)
            title = f"{self.cfg.model_family} {self.cfg.model_type} final"
            if self.cfg.model_type == "lora":
                self._write_lora(out, title)
            else:
                unet = self._ema_copy() if self.ema is not None else self.trained["unet"]
                tes = [self.trained.get(n, te) for n, te in zip(self.adapter.text_encoder_names,
                                                                 self.adapter.text_encoders, strict=True)]
                pipe = self.adapter.build_pipeline(unet=unet, text_encoders=tes)
                pipe.save_pretrained(out, safe_serialization=True)
                _stamp_metadata(out, ckpt.modelspec_metadata(self.cfg, title=title, lora=False))
                if self.ema is not None:
                    self.trained["unet"].save_pretrained(out / "unet_non_ema", safe_serialization=True)
        self.acc.wait_for_everyone()
        return out


def _stamp_metadata(folder: Path, meta: dict[str, str]) -> None:
    """Add modelspec keys to the header of every saved safetensors file under ``folder``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for path in folder.rglob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            header = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        header.update(meta)
        header.setdefault("format", "pt")
        save_file(tensors, str(path), metadata=header)
