"""``--dynamo_*``: ``torch.compile`` of the trained denoiser, whole or per repeated block.

Regional compilation (``--dynamo_use_regional_compilation``) compiles each repeated transformer
block in place (``nn.Module.compile``), so one compiled graph serves every block of a list and a
deep transformer's cold start stays short; the blocks are the family's ``transformer_block_lists``,
else the classes the diffusers model names in ``_repeated_blocks`` (what diffusers'
``compile_repeated_blocks`` uses). In-place compilation keeps module names, so saved weights and
LoRA keys do not change. Unset ``--dynamo_mode``/``--dynamo_fullgraph``/``--dynamo_dynamic`` keep
``torch.compile``'s defaults.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..config import ConfigError, Problem

log = logging.getLogger(__name__)


def compile_kwargs(cfg: Any) -> dict[str, Any] | None:
    """``torch.compile`` keyword arguments from the config, or None when ``--dynamo_backend`` is ``no``."""
    backend = getattr(cfg, "dynamo_backend", None) or "no"
    if backend == "no":
        return None
    kwargs: dict[str, Any] = {"backend": backend}
    if getattr(cfg, "dynamo_mode", None) and cfg.dynamo_mode != "default":
        kwargs["mode"] = cfg.dynamo_mode
    if getattr(cfg, "dynamo_fullgraph", None) is not None:
        kwargs["fullgraph"] = bool(cfg.dynamo_fullgraph)
    if getattr(cfg, "dynamo_dynamic", None) is not None:
        kwargs["dynamic"] = bool(cfg.dynamo_dynamic)
    return kwargs


def repeated_blocks(family: Any, denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks regional compilation compiles (see the module docstring)."""
    if family.transformer_block_lists:
        return family.transformer_blocks(denoiser)
    names = set(getattr(denoiser, "_repeated_blocks", None) or ())
    return [m for m in denoiser.modules() if type(m).__name__ in names]


def compile_denoiser(cfg: Any, family: Any, denoiser: torch.nn.Module) -> int:
    """Compile ``denoiser`` in place as configured; returns how many modules were compiled (0: none).

    Raises :class:`ConfigError` when regional compilation finds no repeated blocks in the model.
    """
    kwargs = compile_kwargs(cfg)
    if kwargs is None:
        return 0
    if getattr(cfg, "dynamo_use_regional_compilation", False):
        blocks = repeated_blocks(family, denoiser)
        if not blocks:
            raise ConfigError([Problem("dynamo_use_regional_compilation", True,
                                       f"the {family.family} model names no repeated blocks to compile; "
                                       "compile the whole model (leave it unset)")])
        for block in blocks:
            block.compile(**kwargs)
        log.info("torch.compile %s: %d repeated blocks of the %s", kwargs, len(blocks), family.denoiser_name)
        return len(blocks)
    denoiser.compile(**kwargs)
    log.info("torch.compile %s: the whole %s", kwargs, family.denoiser_name)
    return 1
