"""The batch handed to the training loop."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """One micro-batch of a single aspect bucket. Sizes are (height, width) as SDXL conditioning expects."""

    latents: torch.Tensor  # [B, C, h, w]; video families: [B, C, F, h, w]
    text: dict[str, torch.Tensor]  # each [B, ...], stacked per key from Encoders.encode_prompts
    original_sizes: list[tuple[int, int]]
    crop_coords: list[tuple[int, int]]  # (top, left)
    target_sizes: list[tuple[int, int]]
    captions: list[str]  # after caption dropout ("" when dropped)
    paths: list[str]
    dataset_ids: list[str]
    is_regularisation: list[bool]
    masks: torch.Tensor | None = None
    #: tensors cached with the latents that condition the denoiser, stacked per name (``[B, ...]``): what a
    #: family's encoder returns besides ``latents`` (e.g. Wan image-to-video's first-frame latents); None: none
    cached_conditioning: dict[str, torch.Tensor] | None = None
    #: video datasets: the entry's ``video.is_i2v`` (None: unset, the family's default applies; image datasets)
    is_i2v: bool | None = None
    #: conditioning datasets (data/conditioning.py): one tensor per slot (``combined``: one per linked dataset in
    #: ``conditioning_data`` order; ``random``: one), each ``[B, C, h, w]`` float32 latents encoded like ``latents``
    #: (aligned types: the same h, w). None when the dataset links no conditioning data.
    conditioning_latents: list[torch.Tensor] | None = None
    #: the pixels those latents were encoded from, ``[B, 3, H, W]`` float32 in [-1, 1] per slot; only when the
    #: family asks for them (``ModelFamily.conditioning_needs_pixels``)
    conditioning_pixels: list[torch.Tensor] | None = None
    conditioning_paths: list[list[str]] | None = None  # [slot][sample] location of each conditioning file
    conditioning_type: str | None = None  # the conditioning_type of the slots (reference_strict when unset)
    epoch: int = 0
    position: int = 0  # index of this batch within its epoch

    def __len__(self) -> int:
        return int(self.latents.shape[0])
