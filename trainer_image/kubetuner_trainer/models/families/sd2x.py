"""Stable Diffusion 2.x: SD 1.x conditioning with an OpenCLIP encoder; the 768px models predict v."""

from __future__ import annotations

from pathlib import Path

from .sd1x import SD1xFamily


class SD2xFamily(SD1xFamily):
    family = "sd2x"
    flavours = {
        "2.1": "stabilityai/stable-diffusion-2-1",
        "2.1-base": "stabilityai/stable-diffusion-2-1-base",
        "2.0": "stabilityai/stable-diffusion-2",
        "2.0-base": "stabilityai/stable-diffusion-2-base",
    }
    default_flavour = "2.1"
    modelspec_architecture = "stable-diffusion-v2"

    @classmethod
    def build_tiny(cls, folder: Path, *, seed: int = 0) -> Path:
        from ..tiny import build_tiny_sd

        return build_tiny_sd(folder, prediction_type="v_prediction", seed=seed)


FAMILY = SD2xFamily
