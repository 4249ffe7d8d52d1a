"""Helpers for the training tests: an in-memory batch source, recording events, in-process training."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from kubetuner_trainer.config import TrainerConfig
from kubetuner_trainer.data.batch import Batch
from kubetuner_trainer.events import NullEvents


class InMemoryData:
    """A resumable, endless batch source over a few random images (the loop's data contract).

    Used where the test is about the loop itself; the end-to-end tests use the real pipeline.
    Records every batch it hands out in ``seen`` as (epoch, position, indices).
    """

    def __init__(self, encoders: Any, *, count: int = 4, batch_size: int = 2, size: int = 32, seed: int = 0,
                 sizes: list[tuple[int, int]] | None = None, masks: torch.Tensor | None = None):
        gen = torch.Generator().manual_seed(seed)
        pixels = torch.rand(count, 3, size, size, generator=gen) * 2 - 1
        self.set_latents(encoders.encode_images(pixels))
        self.prompts = [f"a photo of thing {i}" for i in range(count)]
        self.text = encoders.encode_prompts(self.prompts)
        self.sizes = sizes or [(size, size)] * count
        self.masks = masks  # [count, 1, H, W] pixel masks, or None
        self.is_i2v: bool | None = None  # the batches' Batch.is_i2v (a video dataset's video.is_i2v)
        self.batch_size = batch_size
        self.count = count
        self.epoch = 0
        self.position = 0
        self.seen: list[tuple[int, int, tuple[int, ...]]] = []
        self.data_wait_seconds = 0.0

    def set_latents(self, encoded: torch.Tensor | dict[str, torch.Tensor]) -> None:
        """The encoder's output: latents, or a dict of latents and the conditioning cached with them."""
        conditioning = dict(encoded) if isinstance(encoded, dict) else None
        self.latents = conditioning.pop("latents") if conditioning else encoded
        self.conditioning = conditioning

    @property
    def steps_per_epoch(self) -> int:
        return self.count // self.batch_size

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]

    def __iter__(self):
        while True:
            order = torch.randperm(self.count, generator=torch.Generator().manual_seed(1000 + self.epoch)).tolist()
            idx = order[self.position * self.batch_size:(self.position + 1) * self.batch_size]
            batch = Batch(
                latents=self.latents[idx],
                text={k: torch.stack([self.text[i][k] for i in idx]) for k in self.text[0]},
                original_sizes=[self.sizes[i] for i in idx], crop_coords=[(0, 0)] * len(idx),
                target_sizes=[(32, 32)] * len(idx), captions=[self.prompts[i] for i in idx],
                paths=[str(i) for i in idx], dataset_ids=["mem"] * len(idx), is_regularisation=[False] * len(idx),
                epoch=self.epoch, position=self.position,
                masks=self.masks[idx] if self.masks is not None else None,
                cached_conditioning={k: v[idx] for k, v in self.conditioning.items()} if self.conditioning else None,
                is_i2v=self.is_i2v,
            )
            self.seen.append((self.epoch, self.position, tuple(idx)))
            self.position += 1
            if self.position >= self.steps_per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
            yield batch


class RecordingEvents(NullEvents):
    """Keeps every event; asks the loop to stop once ``stop_after`` optimizer steps were reported."""

    def __init__(self, stop_after: int | None = None):
        self.stop_after = stop_after
        self.steps: list[Any] = []
        self.checkpoints: list[Any] = []
        self.states: list[Any] = []
        self.errors: list[str] = []
        self.validations: list[tuple[int, list[Any]]] = []

    def state(self, state, message=""):
        self.states.append(state)

    def step(self, report):
        self.steps.append(report)

    def checkpoint(self, info, *, seconds):
        self.checkpoints.append(info)

    def error(self, message):
        self.errors.append(message)

    def validation(self, step, images, *, seconds):
        self.validations.append((step, list(images)))

    def stop_requested(self) -> bool:
        return self.stop_after is not None and len(self.steps) >= self.stop_after


def train_in_process(cfg: TrainerConfig, *, data_factory: Callable[[Any], Any] | None = None,
                     events: Any = None, resume: Path | None = None):
    """Load the adapter and run the loop in this process; returns (result, adapter, data)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from kubetuner_trainer.models import load_family
    from kubetuner_trainer.training.loop import TrainingLoop, weight_dtype_for

    AcceleratorState._reset_state()  # tests run many configurations in one process
    accelerator = Accelerator(cpu=True, mixed_precision=cfg.mixed_precision or "no")
    torch.manual_seed(cfg.seed or 0)
    adapter = load_family(cfg, weight_dtype=weight_dtype_for(cfg))
    data = (data_factory or (lambda enc: InMemoryData(enc)))(adapter.encoders())
    loop = TrainingLoop(cfg, accelerator, adapter, data, events, seed=cfg.seed or 0)
    return loop.run(resume), adapter, data


@torch.no_grad()
def fixed_flow_loss(family: Any, data: InMemoryData, sigmas: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)) -> float:
    """The flow-matching loss of ``family`` on ``data`` at fixed noise levels σ (timestep = 1000σ) and
    fixed noise (seed 123): comparable before and after training, unlike the loop's random draws."""
    gen = torch.Generator().manual_seed(123)
    text = {k: torch.stack([t[k] for t in data.text]) for k in data.text[0]}
    total = 0.0
    for sigma in sigmas:
        noise = torch.randn(data.latents.shape, generator=gen)
        steps = torch.full((data.latents.shape[0],), sigma * 1000.0)
        noisy = family.objective.noisy_latents(data.latents, noise, steps)
        pred = family.predict(family.denoiser, noisy, steps, text, None)
        total += float(torch.nn.functional.mse_loss(pred, family.objective.target(data.latents, noise, steps)))
    return total / len(sigmas)


def assert_lora_resume_is_exact(make: Callable[..., TrainerConfig], tmp_path: Path, *,
                                data_factory: Callable[[Any], Any] | None = None) -> None:
    """Four LoRA steps straight equal two steps, a stop, and two resumed steps: same samples seen,
    same losses, bit-identical saved adapter. ``make(output_dir=...)`` builds each run's config."""
    from safetensors.torch import load_file

    from kubetuner_trainer.contract import ExitCode
    from kubetuner_trainer.training import checkpoints as ckpt

    straight, _, straight_data = train_in_process(make(output_dir=str(tmp_path / "a")), data_factory=data_factory)
    split_cfg = make(output_dir=str(tmp_path / "b"))
    first, _, first_data = train_in_process(split_cfg, events=RecordingEvents(stop_after=2),
                                            data_factory=data_factory)
    assert first.exit_code == ExitCode.INTERRUPTED
    resume = ckpt.find_resume_checkpoint(tmp_path / "b", "latest")
    second, _, second_data = train_in_process(split_cfg.replace(resume_from_checkpoint="latest"), resume=resume,
                                              data_factory=data_factory)
    assert second.exit_code == ExitCode.SUCCESS
    assert first_data.seen + second_data.seen == straight_data.seen
    assert first.losses + second.losses == straight.losses
    a, b = (load_file(str(tmp_path / d / "pytorch_lora_weights.safetensors")) for d in ("a", "b"))
    assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a)


# SimpleTuner's defaults add noise offset, dropout and gradient checkpointing; the loop tests pin
# them off so that they test the loop itself (overfitting, exact resume) at a small cost.
LOOP_TEST_OPTIONS = {"noise_offset": 0.0, "lora_dropout": 0.0, "caption_dropout_probability": 0.0,
                     "gradient_checkpointing": False}


def tiny_run_values(model_dir: Path, tmp_path: Path, data_config: Path, **overrides: Any) -> dict[str, Any]:
    """Options of a fast, real sd1x LoRA run on 32x32 buckets (tests override what they vary)."""
    values: dict[str, Any] = {
        "model_family": "sd1x", "model_type": "lora", "pretrained_model_name_or_path": str(model_dir),
        "output_dir": str(tmp_path / "out"), "optimizer": "adamw_bf16", "learning_rate": 1e-3, "lora_rank": 4,
        "mixed_precision": "no", "max_train_steps": 4, "seed": 5,
        "data_backend_config": str(data_config), "cache_dir": str(tmp_path / "cache"),
        "resolution": 0.001024, "resolution_type": "area",  # 32x32 buckets
        "aspect_bucket_alignment": 16, "train_batch_size": 2,
        **LOOP_TEST_OPTIONS,
    }
    values.update(overrides)
    return values



def write_images(folder: Path, count: int, *, start: int = 0, seed: int = 0) -> Path:
    """``count`` random 32x32 PNGs ``img<start>…`` with ``a photo of thing <i>`` caption files in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + start)
    for i in range(start, start + count):
        Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8), "RGB").save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a photo of thing {i}")
    return folder
