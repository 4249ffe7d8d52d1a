"""The training loop on accelerate: forward, loss, accumulation, clipping, EMA, stop.

The data source is injected (anything iterable of batches with ``steps_per_epoch`` and
``state_dict``/``load_state_dict``), as are the model family and the event sink, so the loop
is the same for the CLI, tests and the benchmark. What trains (LoRA or full weights) is a
:class:`~.trainable.Trainable`; checkpoints are written and loaded by a
:class:`~.checkpointer.Checkpointer`; noise levels, model inputs, targets and the loss come
from the family's training objective.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, Problem
from ..contract import ExitCode, TrainerState
from ..events import NullEvents, StepReport, TrainingEvents
from . import checkpoints as ckpt
from .checkpointer import Checkpointer, ProcessState
from .evaluation import build_evaluator, plan_eval_schedule
from .losses import input_perturbation_scale, offset_noise
from .trainable import build_trainable

log = logging.getLogger(__name__)


def weight_dtype_for(cfg: Any) -> torch.dtype:
    """Frozen base weights follow ``--mixed_precision`` for LoRA (bf16 under fp8), or
    ``--base_model_default_dtype`` when the base is quantized and the computation is not plain fp32;
    full fine-tuning keeps fp32 masters."""
    from ..models.quantization import base_weight_dtype, is_quantized

    if cfg.model_type == "full":
        return torch.float32
    if is_quantized(cfg) and cfg.mixed_precision != "no":
        return base_weight_dtype(cfg)
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}.get(cfg.mixed_precision,
                                                                                      torch.float32)


@dataclass
class Schedule:
    """How long the run is, in optimizer steps and epochs.

    ``max_epochs`` is what progress reports show; ``epoch_limit`` stops the run and is set only
    by ``--num_train_epochs`` (an epoch count derived from ``--max_train_steps`` never cuts a run
    short: a resumed run whose dataset grew still reaches its step).
    """

    batches_per_epoch: int
    updates_per_epoch: int
    max_steps: int
    max_epochs: int | None
    epoch_limit: int | None = None


def plan_schedule(cfg: Any, batches_per_epoch: int, start: ckpt.TrainingState | None = None,
                  checkpoint: str = "") -> Schedule:
    """Resolve ``--max_train_steps``/``--num_train_epochs``/``--ignore_final_epochs`` into numbers,
    counted on from ``start`` (the restored position of a resumed run, named ``checkpoint``).

    Like SimpleTuner, whichever of max_train_steps and num_train_epochs comes first ends the run
    (``num_train_epochs`` alone: every batch of every epoch; ``max_train_steps`` alone: that step).
    The steps left in the restored epoch are counted with today's dataset size, so a resumed run
    whose dataset grew or shrank ends where it says it will.

    Raises ValueError when neither is set or the dataset yields no batches; ConfigError when a
    resumed run has nothing left to train.
    """
    if batches_per_epoch <= 0:
        raise ValueError("the dataset yields no batches; check data_backend_config and train_batch_size")
    start = start or ckpt.TrainingState()
    accum = cfg.gradient_accumulation_steps or 1
    updates = max(1, math.ceil(batches_per_epoch / accum))
    epochs = cfg.num_train_epochs or 0
    steps = cfg.max_train_steps or 0
    if steps <= 0 and epochs <= 0:
        raise ValueError("set max_train_steps or num_train_epochs to a positive number")
    if cfg.ignore_final_epochs and steps <= 0:
        raise ValueError("ignore_final_epochs needs max_train_steps")
    limit = epochs if epochs > 0 and not cfg.ignore_final_epochs else None
    left_in_epoch = max(0, updates - math.ceil(start.batches_in_epoch / accum))
    if limit is not None:
        if start.epoch >= limit:
            raise ConfigError([Problem("num_train_epochs", epochs, f"{checkpoint} already finished epoch "
                                       f"{start.epoch} of {limit}; raise num_train_epochs to train on")])
        by_epochs = start.global_step + left_in_epoch + (limit - start.epoch - 1) * updates
        steps = min(steps, by_epochs) if steps > 0 else by_epochs
    if start.global_step >= steps:
        option, value = ("max_train_steps", steps) if cfg.max_train_steps else ("num_train_epochs", epochs)
        raise ConfigError([Problem(option, value, f"{checkpoint} is already at step {start.global_step}; "
                                                  f"nothing is left to train (ask for more than "
                                                  f"{start.global_step} steps)")])
    beyond = max(0, steps - start.global_step - left_in_epoch)
    shown = limit if limit is not None else start.epoch + 1 + math.ceil(beyond / updates)
    return Schedule(batches_per_epoch, updates, steps, None if cfg.ignore_final_epochs else shown, limit)


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

    def __init__(self, cfg: Any, accelerator: Any, family: Any, data: Any,
                 events: TrainingEvents | None = None, *, validator: Any = None, seed: int = 0,
                 memory: Any = None):
        self.cfg = cfg
        self.acc = accelerator
        self.family = family
        self.objective = family.objective
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
        self.trainable = build_trainable(family, cfg)
        from ..acceleration import MemoryPlan
        from ..acceleration.attention import AttentionChoice

        #: where weights live (block swap, group offload, parked helpers); shared with the data pipeline
        self.memory = memory if memory is not None else MemoryPlan(cfg, family, self.device)
        self.attention = AttentionChoice(cfg)
        self.wrapped: dict[str, torch.nn.Module] = {}
        self.ema = None
        self.result = LoopResult(ExitCode.SUCCESS, self.state)
        self._validated_step: int | None = None

    # ----- setup -----------------------------------------------------------------------------
    def setup(self, start: ckpt.TrainingState | None = None, checkpoint: str = "") -> None:
        """Attach the trainable, plan the schedule from ``start`` (a resumed run's position), build
        the optimizer, LR scheduler, EMA and checkpointer."""
        cfg = self.cfg
        trained = self.trainable.attach()
        self._check_export()
        optim = _optim_api()
        groups = self.trainable.param_groups()
        self.params = [p for g in groups for p in g["params"]]
        self.schedule = plan_schedule(cfg, self.data.steps_per_epoch, start, checkpoint)
        optimizer = optim.build_optimizer(cfg, groups)
        self.lr_scheduler = optim.build_lr_scheduler(cfg, optimizer, self.schedule.max_steps)
        self.ema_params = self.trainable.ema_parameters()
        if cfg.use_ema:
            self.ema = optim.EMAModel(self.ema_params, cfg)
        names = list(trained)
        problems = self.attention.check_model(self.family.denoiser, self.family.family)
        if problems:
            raise ConfigError(problems)
        prepared = self.acc.prepare(*[trained[n] for n in names], optimizer,
                                    device_placement=self._device_placement(names) + [True])
        *modules, self.optimizer = prepared if isinstance(prepared, (list, tuple)) else (prepared,)
        self.wrapped = dict(zip(names, modules, strict=True))
        self.release = None  # --optimizer_release_gradients: steps happen in backward hooks
        if optim.releases_gradients(cfg):
            self.release = optim.GradientRelease(self.optimizer, self.params)
        self._accelerate_denoiser()
        self.checkpointer = Checkpointer(
            cfg, self.acc, trainable=self.trainable, training_state=self.state, events=self.events, ema=self.ema,
            states={"optimizer": self.optimizer, "scheduler": self.lr_scheduler, "ema": self.ema},
            process_state=ProcessState(self.generator, self.data, self.params))
        self.evaluator = build_evaluator(cfg, self.data, seed=self.seed, device=self.device,
                                         objective=self.objective)
        self.eval_schedule = plan_eval_schedule(cfg, self.schedule.updates_per_epoch) if self.evaluator else None

    def _device_placement(self, names: list[str]) -> list[bool]:
        """accelerate places every prepared module, except a denoiser whose weights the memory plan places."""
        from ..acceleration import denoiser_placed_by_plan

        placed_by_plan = denoiser_placed_by_plan(self.cfg)
        return [not (placed_by_plan and n == self.family.denoiser_name) for n in names]

    def _accelerate_denoiser(self) -> None:
        """Block swap / group offload, TREAD routing, then ``torch.compile``, on the unwrapped trained denoiser."""
        from ..acceleration.compiling import compile_denoiser
        from .tread import install_token_routing

        name = self.family.denoiser_name
        denoiser = self.acc.unwrap_model(self.wrapped[name]) if name in self.wrapped else self.family.denoiser
        self.memory.apply(denoiser)
        self.token_router = install_token_routing(self.cfg, self.family, denoiser, self.generator)
        compile_denoiser(self.cfg, self.family, denoiser)

    def resume(self, folder: Path) -> None:
        """Load weights, optimizer, scheduler, EMA, RNG and data position from a checkpoint."""
        self.checkpointer.load(folder)

    def save_checkpoint(self, kind: str) -> Path:
        with self.memory.during_save():
            final = self.checkpointer.save(kind)
        self.result.checkpoints.append(final)
        return final

    # ----- the step ----------------------------------------------------------------------------
    def _text(self, batch: Any, modules: dict[str, torch.nn.Module] | None = None) -> dict[str, torch.Tensor]:
        """Conditioning for a batch: cached embeddings, or live encoding when a text encoder trains.

        Caption dropout already happened in the data pipeline (dropped captions arrive as "").
        """
        if self.cfg.train_text_encoder:
            tes = self.trainable.text_encoders(self.wrapped if modules is None else modules)
            return self.family.encode_text(list(batch.captions), text_encoders=tes)
        return {k: v.to(self.device) for k, v in batch.text.items()}

    def compute_loss(self, batch: Any) -> torch.Tensor:
        cfg, objective = self.cfg, self.objective
        latents = batch.latents.to(self.device, dtype=torch.float32)  # [B,C,h,w] or [B,C,F,h,w] (video)
        noise = torch.randn(latents.shape, generator=self.generator).to(self.device)
        noise = offset_noise(cfg, noise.cpu(), self.generator).to(self.device) if cfg.noise_offset else noise
        timesteps = self.family.sample_timesteps(batch, latents, self.generator).to(self.device)
        model_noise = noise
        scale = input_perturbation_scale(cfg, self.state.global_step)
        if scale:
            model_noise = noise + scale * torch.randn(latents.shape, generator=self.generator).to(self.device)
        noisy = objective.noisy_latents(latents, model_noise, timesteps)
        mask = getattr(batch, "masks", None)
        if mask is not None:
            prob = cfg.masked_loss_probability
            if prob < 1.0 and torch.rand(1, generator=self.generator).item() >= prob:
                mask = None
        with self.acc.autocast(), self.attention.training():
            text = self._text(batch)
            pred = self.family.predict(self.trainable.predict_module(self.wrapped, batch), noisy, timesteps, text, batch)
        target = objective.target(latents, noise, timesteps)
        return objective.loss(cfg, pred, target, timesteps, mask)

    def _clip(self) -> float | None:
        limit = self.cfg.max_grad_norm
        if not limit:
            return None
        if self.cfg.grad_clip_method == "norm":
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
        samples = self.cfg.train_batch_size * self.cfg.gradient_accumulation_steps * self.world
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

    @contextlib.contextmanager
    def _eval_mode(self):
        """The unwrapped trained modules in eval mode (no dropout, optimizer eval weights), restored after."""
        unwrapped = {n: self.acc.unwrap_model(m) for n, m in self.wrapped.items()}  # no DDP collectives
        for module in unwrapped.values():
            module.eval()
        _optim_api().optimizer_eval_mode(self.optimizer)
        try:
            yield unwrapped
        finally:
            _optim_api().optimizer_train_mode(self.optimizer)
            for module in unwrapped.values():
                module.train()

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
            with self._eval_mode() as unwrapped, self.trainable.validation_context(), \
                    self.memory.for_validation() as prepare, self.attention.inference():
                trainable = self.trainable
                ema_factory = None
                if self.ema is not None:
                    ema_factory = lambda: prepare(trainable.pipeline(unwrapped, ema=self.ema,  # noqa: E731
                                                                     device=self.device))
                v.run_and_report(
                    self.state.global_step, self.events, lambda: prepare(trainable.pipeline(unwrapped)),
                    ema_pipeline_factory=ema_factory,
                )
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
        start = ckpt.read_state(resume_from) if resume_from is not None else None
        self.setup(start, resume_from.name if resume_from is not None else "")
        self._check_final_not_newer()
        if resume_from is not None:
            self.resume(resume_from)
        cfg, sched = self.cfg, self.schedule
        accum = cfg.gradient_accumulation_steps
        optim = _optim_api()
        optim.optimizer_train_mode(self.optimizer)
        self.events.state(TrainerState.TRAINING, f"training to step {sched.max_steps}")
        set_to_none = bool(cfg.set_grads_to_none or cfg.ramtorch)
        self.optimizer.zero_grad(set_to_none=set_to_none)
        stopped = False
        saved_at = -1  # the step of the last checkpoint this run wrote
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
                if self.release is not None:
                    self.release.before_backward(sync)
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
                kind = self.checkpointer.due(self.state.global_step)
                if kind:  # also at the last step, as SimpleTuner does: a longer run can resume from it
                    self.save_checkpoint(kind)
                    saved_at = self.state.global_step
                self._validate(epoch_end=False)
                # checkpoint and validation time is not part of the next step's timing
                step_started = time.monotonic()
                wait_before = float(getattr(self.data, "data_wait_seconds", 0.0) or 0.0)
            if end_of_epoch:
                self.state.epoch += 1
                self.state.batches_in_epoch = 0
                if (cfg.checkpoint_epoch_interval and self.state.epoch % cfg.checkpoint_epoch_interval == 0
                        and saved_at != self.state.global_step):
                    self.save_checkpoint("epoch")
                    saved_at = self.state.global_step
                if self.state.global_step < sched.max_steps and not self._epochs_done():
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
        return self.schedule.epoch_limit is not None and self.state.epoch >= self.schedule.epoch_limit

    def _optimizer_step(self, losses: list[torch.Tensor], step_started: float, wait_before: float) -> None:
        from .precision import cast_gradients

        grad_norm = None
        if self.release is None:  # released gradients were applied and freed in the backward pass
            cast_gradients(self.cfg, self.params)
            grad_norm = self._clip()
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=bool(self.cfg.set_grads_to_none or self.cfg.ramtorch))
        self.state.global_step += 1
        self.trainable.after_step(self.state.global_step)
        self.memory.after_step(self.state.global_step)
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
        with self._eval_mode() as unwrapped:

            def predict(batch: Any, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
                with self.acc.autocast(), self.attention.training():
                    return self.family.predict(self.trainable.predict_module(unwrapped, batch), noisy, timesteps,
                                               self._text(batch, unwrapped), batch)

            reduce = (lambda t: self.acc.reduce(t, reduction="sum")) if self.world > 1 else None
            components = self.evaluator.evaluate(predict, reduce)
        self.result.eval_losses[self.state.global_step] = components
        log.info("step %d: evaluation loss %.6f", self.state.global_step, components["eval_loss"])
        return components

    # ----- the final model --------------------------------------------------------------------
    def _check_export(self) -> None:
        """A dry export of the freshly attached weights: what cannot be saved is refused before step 1."""
        trainable = self.trainable
        try:
            trainable.check_export(self.output_dir / f".export-check-{self.rank}")
        except ConfigError:
            raise
        except Exception as exc:  # any failure here would have failed the final save
            option = trainable.export_option
            raise ConfigError([Problem(option, getattr(self.cfg, option, None) or "(default)",
                                       f"the trained weights cannot be saved this way: {exc}")]) from exc

    def _check_final_not_newer(self) -> None:
        """Refuse a run that would replace the final model in ``output_dir`` with an older one."""
        saved = ckpt.read_final_state(self.output_dir)
        if saved is not None and saved.global_step > self.schedule.max_steps:
            option, value = (("max_train_steps", self.cfg.max_train_steps) if self.cfg.max_train_steps
                             else ("num_train_epochs", self.cfg.num_train_epochs))
            raise ConfigError([Problem(option, value, f"{self.output_dir} holds a final model from step "
                                                      f"{saved.global_step}; this run ends at step "
                                                      f"{self.schedule.max_steps} and would replace it with an "
                                                      f"older one (train further, or use another output_dir)")])

    def save_final(self) -> Path:
        """The trained result in diffusers layout in ``output_dir`` (LoRA file, or a full pipeline),
        then ``training_state.json`` (kind ``final``) saying which step it holds."""
        _optim_api().optimizer_eval_mode(self.optimizer)
        self.acc.wait_for_everyone()
        out = self.output_dir
        if self.is_main:
            out.mkdir(parents=True, exist_ok=True)
            self._check_final_not_newer()
            with self.memory.during_save():
                self.trainable.export(out, title=f"{self.cfg.model_family} {self.cfg.model_type} final",
                                      ema=self.ema)
            self.state.kind = "final"
            (out / ckpt.STATE_FILE).write_text(self.state.to_json())
        self.acc.wait_for_everyone()
        return out
