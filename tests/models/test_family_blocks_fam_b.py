"""The repeated-block lists of Qwen-Image, HiDream, OmniGen and Cosmos name their denoisers' block lists
(what block swap and regional compilation walk)."""

from __future__ import annotations

import pytest
import torch

from kubetuner_trainer.models import load_family


@pytest.mark.parametrize(("family", "count"), [("qwen_image", 2), ("hidream", 2), ("omnigen", 2),
                                               ("cosmos2image", 2)])
def test_block_lists_cover_every_repeated_block(model_cfg, family, count):
    model = load_family(model_cfg(family, mixed_precision="no"))
    blocks = model.transformer_blocks()
    assert len(blocks) == count and all(isinstance(b, torch.nn.Module) for b in blocks)
    # each is a whole block: together they hold most of the denoiser's weights
    in_blocks = sum(p.numel() for b in blocks for p in b.parameters())
    assert in_blocks > 0.4 * sum(p.numel() for p in model.denoiser.parameters())
