"""What a loaded model is made of, and where it came from (no torch stack needed to import this)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelSource:
    """Where the components were loaded from (part of the cache identity).

    ``denoiser``/``denoiser_subfolder`` come from the family's override options
    (``--pretrained_unet_*`` or ``--pretrained_transformer_*``); ``text_encoders`` maps a text
    encoder's pipeline name to a separate location (e.g. ``--pretrained_t5_model_name_or_path``).
    """

    model: str
    revision: str | None = None
    variant: str | None = None
    vae: str | None = None
    denoiser: str | None = None
    denoiser_subfolder: str | None = None
    single_file: bool = False
    text_encoders: tuple[tuple[str, str], ...] = ()


@dataclass
class Components:
    """The loaded parts of one model. ``text_encoders``/``tokenizers`` are in pipeline order.

    ``denoiser`` is the network that is trained: a UNet or a diffusion transformer.
    """

    denoiser: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    noise_scheduler: Any
    source: ModelSource
    extra: dict[str, Any] = field(default_factory=dict)
