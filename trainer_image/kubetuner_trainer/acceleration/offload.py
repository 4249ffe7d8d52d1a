"""Where the model's weights live during a run: block swap, group offload, and the
residency of the VAE and text encoders around caching, validation and saving.

:class:`MemoryPlan` is built from the config once the model is loaded and the trained modules are
attached; the loop calls :meth:`MemoryPlan.apply` after ``accelerator.prepare`` (which is told not
to place the denoiser when the plan does), :meth:`after_caching` once the caches are built,
:meth:`for_validation` around validation renders, :meth:`during_save` around checkpoint writes and
:meth:`after_step` after every optimizer step.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..config import ConfigError, Problem
from .blockswap import BlockSwap

log = logging.getLogger(__name__)


def denoiser_placed_by_plan(cfg: Any) -> bool:
    """Whether the denoiser's weights are placed by the memory plan rather than moved whole to the device."""
    return bool((getattr(cfg, "musubi_blocks_to_swap", 0) or 0) > 0 or getattr(cfg, "enable_group_offload", False)
                or getattr(cfg, "ramtorch", False))


def clear_accelerator_cache() -> None:
    """Return cached, unused accelerator memory to the driver (and collect Python garbage first)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        mps.empty_cache()


def place_module(module: torch.nn.Module, device: torch.device, skip: set[int] = frozenset()) -> None:
    """Move every parameter and buffer of ``module`` to ``device`` in place, except the parameters whose
    ``id`` is in ``skip`` (unlike ``module.to``, the skipped ones never touch the device)."""
    for sub in module.modules():
        for param in sub._parameters.values():
            if param is not None and id(param) not in skip and param.device != device:
                param.data = param.data.to(device)
        for name, buf in sub._buffers.items():
            if buf is not None and buf.device != device:
                sub._buffers[name] = buf.to(device)


class MemoryPlan:
    """The placement decisions of one run (see the module docstring)."""

    def __init__(self, cfg: Any, family: Any, device: torch.device | str):
        self.cfg = cfg
        self.family = family
        self.device = torch.device(device)
        self.block_swap: BlockSwap | None = None
        self.group_offload = False
        self.ramtorch_layers = 0
        #: helpers converted to RamTorch: never parked (``text``, ``vae``)
        self.pinned: set[str] = set()
        #: where a parked helper waits (``text``/``vae`` → ``cpu`` or ``meta``); absent: on the device
        self.parked: dict[str, str] = {}

    # ----- the denoiser ----------------------------------------------------------------------
    def apply(self, denoiser: torch.nn.Module) -> None:
        """Slice its attention, then swap blocks or group-offload the (unwrapped) denoiser as configured.

        Raises :class:`ConfigError` when the model cannot honour the configured amount (e.g. more
        blocks to swap than it has).
        """
        cfg = self.cfg
        if getattr(cfg, "unet_attention_slice", False):
            # "auto" (as SimpleTuner asks): diffusers computes each attention in two slices of its heads
            denoiser.set_attention_slice("auto")
            log.info("unet_attention_slice: the %s computes attention in slices", self.family.denoiser_name)
        swap = int(getattr(cfg, "musubi_blocks_to_swap", 0) or 0)
        if swap > 0:
            self._swap_blocks(denoiser, swap)
        elif getattr(cfg, "enable_group_offload", False):
            self._group_offload(denoiser)
        elif getattr(cfg, "ramtorch", False):
            self._ramtorch(denoiser)

    def _ramtorch(self, denoiser: torch.nn.Module) -> None:
        from .ramtorch import convert_linear_layers, is_ramtorch, parse_patterns

        cfg, family = self.cfg, self.family
        patterns = parse_patterns(getattr(cfg, "ramtorch_target_modules", None))
        self.ramtorch_layers = convert_linear_layers(denoiser, self.device, patterns)
        place_module(denoiser, self.device, skip={id(p) for p in denoiser.parameters() if is_ramtorch(p)})
        log.info("ramtorch: %d Linear layers of the %s stream their weights from CPU memory",
                 self.ramtorch_layers, family.denoiser_name)

    def _swap_blocks(self, denoiser: torch.nn.Module, count: int) -> None:
        blocks = self.family.transformer_blocks(denoiser)
        if count > len(blocks):
            raise ConfigError([Problem("musubi_blocks_to_swap", count,
                                       f"the {self.family.family} model has only {len(blocks)} transformer "
                                       f"blocks ({', '.join(self.family.transformer_block_lists)}); "
                                       f"swap at most {len(blocks)}")])
        swapped = blocks[len(blocks) - count:]
        masters = {id(p) for b in swapped for p in b.parameters() if not p.requires_grad}
        place_module(denoiser, self.device, skip=masters)
        self.block_swap = BlockSwap(swapped, compute_device=self.device,
                                    swap_device=getattr(self.cfg, "musubi_block_swap_device", None) or "cpu")
        log.info("block swap: the frozen weights of the last %d of %d transformer blocks (%d parameters) "
                 "wait on %s", count, len(blocks), self.block_swap.swapped_parameters, self.block_swap.swap_device)

    def _group_offload(self, denoiser: torch.nn.Module) -> None:
        cfg = self.cfg
        kwargs: dict[str, Any] = {"offload_type": cfg.group_offload_type or "block_level",
                                  "use_stream": bool(cfg.group_offload_use_stream) and self.device.type == "cuda"}
        if kwargs["offload_type"] == "block_level":
            kwargs["num_blocks_per_group"] = int(cfg.group_offload_blocks_per_group or 1)
        if cfg.group_offload_use_stream and self.device.type != "cuda":
            log.info("group_offload_use_stream: no CUDA stream on %s; offloading with plain copies", self.device)
        denoiser.enable_group_offload(onload_device=self.device, offload_device=torch.device("cpu"), **kwargs)
        self.group_offload = True
        log.info("group offload of the %s: %s", self.family.denoiser_name, kwargs)

    def replace(self) -> None:
        """Put every weight back where the plan keeps it (after something moved the modules)."""
        family = self.family
        denoiser = family.denoiser
        if self.block_swap is not None:
            masters = {id(p) for b in self.block_swap.blocks for _, _, p in b.frozen}
            place_module(denoiser, self.device, skip=masters)
            self.block_swap.offload()
        elif self.ramtorch_layers:
            from .ramtorch import is_ramtorch

            place_module(denoiser, self.device, skip={id(p) for p in denoiser.parameters() if is_ramtorch(p)})
        elif not self.group_offload:
            denoiser.to(self.device)

    # ----- the frozen helpers ------------------------------------------------------------------
    def encoders(self, inner: Any) -> ResidentEncoders:
        """The data pipeline's encoders, bringing a parked VAE or text encoder onto the device per call."""
        return ResidentEncoders(inner, self)

    def before_caching(self) -> None:
        """``--offload_during_startup``: the text encoders wait on the CPU while the VAE cache is built.
        ``--ramtorch_text_encoder`` / ``--ramtorch_vae`` (with ``--ramtorch``) convert those helpers' Linear
        layers before they encode anything; converted helpers stay where they are for the whole run."""
        cfg, family = self.cfg, self.family
        if cfg.ramtorch and cfg.ramtorch_text_encoder:
            self._ramtorch_helper("text", list(family.text_encoders))
        if cfg.ramtorch and cfg.ramtorch_vae and family.vae is not None:
            self._ramtorch_helper("vae", [getattr(family.vae, part).mid_block for part in ("encoder", "decoder")
                                          if hasattr(getattr(family.vae, part, None), "mid_block")])
        if cfg.offload_during_startup and not cfg.train_text_encoder and "text" not in self.pinned:
            self._park("text", "cpu")

    def _ramtorch_helper(self, kind: str, modules: list[torch.nn.Module]) -> None:
        from .ramtorch import convert_linear_layers, is_ramtorch

        for module in modules:
            convert_linear_layers(module, self.device, [])
            place_module(module, self.device, skip={id(p) for p in module.parameters() if is_ramtorch(p)})
        self.pinned.add(kind)

    def after_caching(self) -> None:
        """Once the caches are built, the frozen helpers leave the device: the text encoders to the CPU
        (freed with ``--fully_unload_text_encoder``), the VAE to the CPU unless ``--keep_vae_loaded``.
        Anything that still encodes (on-demand caching, validation) brings them back per call."""
        cfg, family = self.cfg, self.family
        if not cfg.train_text_encoder and "text" not in self.pinned:
            self._park("text", "meta" if cfg.fully_unload_text_encoder else "cpu")
        if not cfg.keep_vae_loaded and family.vae is not None and "vae" not in self.pinned:
            self._park("vae", "cpu")
        if self.device.type != "cpu":
            clear_accelerator_cache()

    def _park(self, kind: str, where: str) -> None:
        if where == "cpu" and self.device.type == "cpu":
            return  # already there
        self._move(kind, where)
        self.parked[kind] = where

    def _move(self, kind: str, where: str | torch.device) -> None:
        family = self.family
        if kind == "vae":
            if family.vae is not None:
                family.vae.to(where)
            return
        if self.parked.get("text") == "meta" and where != "meta":
            family.reload_text_encoders()
        for module in family.text_encoders:
            module.to(where)

    @contextlib.contextmanager
    def using(self, *kinds: str) -> Iterator[None]:
        """The parked helpers of ``kinds`` (``text``, ``vae``) on the device inside the block, parked again after."""
        moved = [k for k in kinds if self.parked.get(k)]
        for kind in moved:
            self._move(kind, self.device)
        try:
            yield
        finally:
            for kind in moved:
                self._move(kind, self.parked[kind])

    @contextlib.contextmanager
    def for_validation(self) -> Iterator[Callable[[Any], Any]]:
        """The VAE and text encoders on the device while validation renders; yields the function that
        prepares each validation pipeline: with ``--enable_model_cpu_offload`` diffusers keeps its models on
        the CPU and moves each onto the device while it runs; every weight is back in its place after."""
        offloaded: list[Any] = []

        def prepare(pipeline: Any) -> Any:
            if self.cfg.enable_model_cpu_offload:
                pipeline.enable_model_cpu_offload(device=self.device)
                offloaded.append(pipeline)
            return pipeline

        with self.using("text", "vae"):
            try:
                yield prepare
            finally:
                for pipeline in offloaded:
                    pipeline.remove_all_hooks()
                if offloaded:
                    self._return_from_cpu_offload()

    def _return_from_cpu_offload(self) -> None:
        """After a model-CPU-offloaded pipeline moved everything to the CPU: the denoiser and the helpers
        that live on the device go back there (parked ones are brought back by :meth:`using`)."""
        family = self.family
        self.replace()
        if family.vae is not None:
            family.vae.to(self.device)
        for module in family.text_encoders:
            module.to(self.device)

    @contextlib.contextmanager
    def during_save(self) -> Iterator[None]:
        """With ``--offload_during_save``: every model part on the CPU while a checkpoint is written."""
        if self.parked.get("text") == "meta":  # a full-model export writes the text encoders too
            with self.using("text"):
                yield
            return
        if not self.cfg.offload_during_save or self.device.type == "cpu" or self.group_offload:
            yield
            return
        family = self.family
        resident = [family.denoiser] + ([] if self.parked.get("vae") or family.vae is None else [family.vae]) + \
            ([] if self.parked.get("text") else list(family.text_encoders))
        for module in resident:
            module.to("cpu")
        clear_accelerator_cache()
        try:
            yield
        finally:
            for module in resident:
                if module is not family.denoiser:
                    module.to(self.device)
            self.replace()

    def after_step(self, step: int) -> bool:
        """``--accelerator_cache_clear_interval``: clear the accelerator's cache every N steps; True when it did."""
        interval = getattr(self.cfg, "accelerator_cache_clear_interval", None)
        if interval and step % int(interval) == 0:
            clear_accelerator_cache()
            return True
        return False


class ResidentEncoders:
    """The ``Encoders`` of the data pipeline with the memory plan's residency (see :meth:`MemoryPlan.encoders`)."""

    def __init__(self, inner: Any, plan: MemoryPlan):
        self._inner = inner
        self._plan = plan
        self.cache_key = inner.cache_key
        self.latent_downscale = inner.latent_downscale
        # the conditioning hooks the data pipeline reads (data/conditioning.py)
        self.conditioning_needs_pixels = getattr(inner, "conditioning_needs_pixels", False)
        self.text_uses_conditioning_images = getattr(inner, "text_uses_conditioning_images", False)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        with self._plan.using("vae"):
            return self._inner.encode_images(pixels)

    def encode_prompts_with_images(self, prompts: list[str],
                                   images: list[list[torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        with self._plan.using("text"):
            return self._inner.encode_prompts_with_images(prompts, images)

    def encode_prompts(self, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        with self._plan.using("text"):
            return self._inner.encode_prompts(prompts)
