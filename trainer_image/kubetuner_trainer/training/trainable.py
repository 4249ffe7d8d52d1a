"""What a run trains, one class per ``--model_type``: attach, optimizer groups, save, load, export.

* :class:`LoRATrainable` — PEFT LoRA layers on the frozen denoiser (and text encoders with
  ``--train_text_encoder``); checkpoints and the final result are one LoRA file.
* :class:`FullTrainable` — every weight of the denoiser (and text encoders); checkpoints hold one
  diffusers model folder per trained module, the final result is the whole pipeline.

Modules are keyed by their pipeline name (the family's ``denoiser_name``, ``text_encoder``, …),
which is also their optimizer group name, checkpoint folder and LoRA key prefix.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from ..files import publish, save_safetensors
from . import checkpoints as ckpt
from .lora import attach_lora, load_lora_into, lora_adapter_metadata, lora_state_dicts

TEXT_ENCODER_GROUP = "text_encoder"


class Trainable(ABC):
    """The trained modules of one run (see the module docstring)."""

    def __init__(self, family: Any, cfg: Any):
        self.family = family
        self.cfg = cfg
        self.modules: dict[str, torch.nn.Module] = {}

    @property
    def denoiser_name(self) -> str:
        return self.family.denoiser_name

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.modules[self.denoiser_name]

    def attach(self) -> dict[str, torch.nn.Module]:
        """Make the trained parameters require gradients; returns the trained modules by name."""
        self.modules = self._attach()
        for module in self.modules.values():
            module.train()
        if self.cfg.gradient_checkpointing:
            self.family.enable_gradient_checkpointing(self.denoiser, self.cfg.gradient_checkpointing_interval)
            for name, module in self.modules.items():
                if name != self.denoiser_name and hasattr(module, "gradient_checkpointing_enable"):
                    module.gradient_checkpointing_enable()
        return self.modules

    @abstractmethod
    def _attach(self) -> dict[str, torch.nn.Module]:
        ...

    def param_groups(self) -> list[dict[str, Any]]:
        """One optimizer group per module: the denoiser's at ``--learning_rate``, text encoders' at
        ``--text_encoder_lr`` when set."""
        cfg = self.cfg
        groups = []
        for name, module in self.modules.items():
            params = [p for p in module.parameters() if p.requires_grad]
            is_denoiser = name == self.denoiser_name
            group: dict[str, Any] = {"params": params, "name": name if is_denoiser else TEXT_ENCODER_GROUP}
            lr = cfg.text_encoder_lr if not is_denoiser and cfg.text_encoder_lr is not None else cfg.learning_rate
            if lr is not None:
                group["lr"] = lr
            groups.append(group)
        return groups

    def ema_parameters(self) -> list[torch.Tensor]:
        """The parameters EMA follows: the denoiser's trained ones (text encoders train without one)."""
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    def ema_denoiser(self, ema: Any) -> torch.nn.Module:
        """A CPU copy of the denoiser carrying the EMA weights (the training weights stay untouched)."""
        copied = copy.deepcopy(self.denoiser).to("cpu")
        ema.copy_to([p for p in copied.parameters() if p.requires_grad])
        return copied

    def text_encoders(self, modules: dict[str, torch.nn.Module] | None = None) -> list[torch.nn.Module]:
        """The pipeline's text encoders, with the trained (or given) ones in place of the loaded ones."""
        modules = self.modules if modules is None else modules
        return [modules.get(n, te) for n, te in zip(self.family.text_encoder_names, self.family.text_encoders,
                                                     strict=True)]

    def predict_module(self, modules: dict[str, torch.nn.Module], batch: Any) -> Any:
        """What the family's ``predict`` calls for ``batch``: the (wrapped) denoiser among ``modules``, or the
        frozen one when it does not train."""
        return modules.get(self.family.denoiser_name, self.family.denoiser)

    def pipeline(self, modules: dict[str, torch.nn.Module], *, ema: Any = None,
                 device: torch.device | str | None = None) -> Any:
        """The family's pipeline around the unwrapped trained ``modules`` (with ``ema``: its EMA weights on
        ``device``), for validation renders."""
        denoiser = self.ema_denoiser(ema).to(device) if ema is not None else modules[self.denoiser_name]
        return self.family.build_pipeline(denoiser=denoiser, text_encoders=self.text_encoders(modules))

    def metadata(self, title: str) -> dict[str, str]:
        return ckpt.modelspec_metadata(self.cfg, architecture=self.family.modelspec_architecture, title=title,
                                       lora=isinstance(self, LoRATrainable))

    @abstractmethod
    def save(self, folder: Path, *, title: str, ema: Any = None) -> None:
        """Write the trained weights of a checkpoint into ``folder``."""

    @abstractmethod
    def load(self, folder: Path) -> None:
        """Load the trained weights of a checkpoint folder written by :meth:`save`."""

    @abstractmethod
    def export(self, out: Path, *, title: str, ema: Any = None) -> None:
        """Write the final result into ``out`` (main process only)."""

    def after_step(self, global_step: int) -> None:  # noqa: B027 - optional hook, most trainables need none
        """Called after every optimizer step with the new step count (for step-dependent adapters)."""

    def validation_context(self) -> contextlib.AbstractContextManager[None]:
        """Entered around validation renders (e.g. to set an adapter's validation strength)."""
        return contextlib.nullcontext()

    #: the option named when the export check fails
    export_option = "model_type"

    def check_export(self, scratch: Path) -> None:
        """Export the freshly attached weights once, before training, so that a combination whose
        export fails is found at the start and not after the last step. This default exports into
        ``scratch`` and removes it; kinds with a cheaper dry run override it. Raises what export raises."""
        try:
            self.export(scratch, title="export check")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


class LoRATrainable(Trainable):
    """LoRA adapters (``--model_type lora``)."""

    export_option = "lora_format"

    #: ``--fuse_qkv_projections``: the fused layers of the denoiser (training/fused_qkv.py)
    fusion: Any = None

    def _attach(self) -> dict[str, torch.nn.Module]:
        if not self.cfg.fuse_qkv_projections:
            return attach_lora(self.family, self.cfg)
        from . import fused_qkv

        family = self.family
        self.fusion = fused_qkv.fuse(family.denoiser, family.family)
        trained = attach_lora(family, self.cfg,
                              lambda targets: fused_qkv.fused_targets(family.denoiser, targets, self.fusion))
        fused_qkv.SupersededCheck(family.denoiser, self.fusion, family.family)
        return trained

    @property
    def lora_format(self) -> str:
        return self.cfg.lora_format or "diffusers"

    def _lora_state(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, Any]]]:
        """The LoRA weights and adapter metadata per module as files hold them (fused layers split)."""
        if self.fusion is None:
            return lora_state_dicts(self.modules), lora_adapter_metadata(self.modules)
        from .fused_qkv import unfuse_lora_state, unfused_metadata

        name = self.denoiser_name
        states = lora_state_dicts(self.modules, lambda n, sd: unfuse_lora_state(sd, self.fusion) if n == name else sd)
        meta = lora_adapter_metadata(self.modules)
        meta[name] = unfused_metadata(meta[name])
        return states, meta

    def save(self, folder: Path, *, title: str, ema: Any = None) -> None:
        self._write(folder, title, self.lora_format)

    def _write(self, folder: Path, title: str, lora_format: str, filename: str = ckpt.LORA_FILE) -> Path:
        states, meta = self._lora_state()
        return ckpt.save_lora_file(folder, self.family, states, meta, lora_format=lora_format,
                                   metadata=self.metadata(title), filename=filename)

    def load(self, folder: Path) -> None:
        adapt = None
        if self.fusion is not None:
            from .fused_qkv import fuse_lora_state

            def adapt(name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
                return fuse_lora_state(state, self.fusion) if name == self.denoiser_name else state
        load_lora_into(self.family, self.modules, folder / ckpt.LORA_FILE, adapt)

    def export(self, out: Path, *, title: str, ema: Any = None) -> None:
        """The LoRA file in ``--lora_format``; for another format than diffusers the diffusers-format
        file is written first (``pytorch_lora_weights.diffusers.safetensors``), so a failing
        conversion never loses the trained weights."""
        if self.lora_format != "diffusers":
            self._write(out, title, "diffusers", ckpt.DIFFUSERS_LORA_FILE)
        self.save(out, title=title)

    def check_export(self, scratch: Path) -> None:
        """Convert the attached adapter to ``--lora_format`` and serialize it in memory (writes nothing)."""
        from safetensors.torch import save

        states, meta = self._lora_state()
        tensors, header = ckpt.lora_file_contents(self.family, states, meta, lora_format=self.lora_format,
                                                  metadata=self.metadata("export check"))
        save(tensors, metadata=header)


class FullTrainable(Trainable):
    """Every weight of the denoiser, plus the text encoders with ``--train_text_encoder`` (``--model_type full``)."""

    def _attach(self) -> dict[str, torch.nn.Module]:
        family = self.family
        family.denoiser.requires_grad_(True)
        modules = {self.denoiser_name: family.denoiser}
        if self.cfg.train_text_encoder:
            for _, name, te in family.trainable_text_encoders():
                te.requires_grad_(True)
                modules[name] = te
        return modules

    def save(self, folder: Path, *, title: str, ema: Any = None) -> None:
        for name, module in self.modules.items():
            module.save_pretrained(folder / name, safe_serialization=True)
        if ema is not None:
            self.ema_denoiser(ema).save_pretrained(folder / f"{self.denoiser_name}_ema", safe_serialization=True)
        publish(folder)

    def load(self, folder: Path) -> None:
        for name, module in self.modules.items():
            result = module.load_state_dict(ckpt.load_safetensors_folder(folder / name), strict=False)
            params = {n for n, _ in module.named_parameters()}
            missing = [k for k in result.missing_keys if k in params]  # buffers may be left out on save
            if missing or result.unexpected_keys:
                raise ValueError(f"{folder / name} does not fit the {name}: missing {missing[:5]}, "
                                 f"unexpected {list(result.unexpected_keys)[:5]}")

    def check_export(self, scratch: Path) -> None:
        """Assemble the pipeline the export saves and its header (saving a whole pipeline twice costs too much)."""
        self.family.build_pipeline(denoiser=self.denoiser, text_encoders=self.text_encoders())
        self.metadata("export check")

    def export(self, out: Path, *, title: str, ema: Any = None) -> None:
        """The whole pipeline in diffusers layout (EMA weights in the denoiser when EMA ran; the
        training weights then in ``<denoiser>_non_ema/``), modelspec keys in every file's header."""
        denoiser = self.ema_denoiser(ema) if ema is not None else self.denoiser
        pipe = self.family.build_pipeline(denoiser=denoiser, text_encoders=self.text_encoders())
        pipe.save_pretrained(out, safe_serialization=True)
        stamp_metadata(out, self.metadata(title))
        if ema is not None:
            self.denoiser.save_pretrained(out / f"{self.denoiser_name}_non_ema", safe_serialization=True)
        publish(out)


def build_trainable(family: Any, cfg: Any) -> Trainable:
    """The trainable for ``--model_type`` (and, for LoRA, ``--lora_type``)."""
    if cfg.controlnet:
        from .controlnet import ControlNetFullTrainable, ControlNetLoRATrainable

        return ControlNetFullTrainable(family, cfg) if cfg.model_type == "full" else ControlNetLoRATrainable(family, cfg)
    if cfg.model_type == "full":
        return FullTrainable(family, cfg)
    if cfg.lora_type == "lycoris":
        from .lycoris import LycorisTrainable  # imports lycoris-lora only when asked for

        return LycorisTrainable(family, cfg)
    if cfg.peft_lora_mode == "singlora":
        from .singlora import SingLoRATrainable  # imports peft-singlora only when asked for

        return SingLoRATrainable(family, cfg)
    return LoRATrainable(family, cfg)


def stamp_metadata(folder: Path, meta: dict[str, str]) -> None:
    """Add modelspec keys to the header of every saved safetensors file under ``folder``."""
    from safetensors import safe_open

    for path in folder.rglob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            header = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        header.update(meta)
        header.setdefault("format", "pt")
        save_safetensors(tensors, path, header)
