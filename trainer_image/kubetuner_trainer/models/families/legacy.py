"""``legacy``: the older name of the SD 1.x/2.x family (the spec's model-family section).

One family covers both generations, as it did in SimpleTuner before ``sd1x``/``sd2x`` were split:
the flavours of both are accepted, and the loaded model decides which architecture its saved
files name (SD 2.x text encoders are OpenCLIP-H, hidden size 1024; SD 1.x's CLIP-L has 768).
"""

from __future__ import annotations

from typing import Any

from .sd1x import SD1xFamily
from .sd2x import SD2xFamily

#: hidden size of the SD 2.x text encoder (OpenCLIP ViT-H/14), which tells a 2.x model from a 1.x one
SD2_TEXT_HIDDEN_SIZE = 1024


class LegacyFamily(SD1xFamily):
    family = "legacy"
    flavours = {**SD1xFamily.flavours, **SD2xFamily.flavours}

    def __init__(self, cfg: Any, components: Any, **kwargs: Any):
        super().__init__(cfg, components, **kwargs)
        hidden = components.text_encoders[0].config.hidden_size
        generation = SD2xFamily if hidden == SD2_TEXT_HIDDEN_SIZE else SD1xFamily
        self.modelspec_architecture = generation.modelspec_architecture


FAMILY = LegacyFamily
