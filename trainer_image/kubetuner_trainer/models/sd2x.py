"""Stable Diffusion 2.x: SD 1.x conditioning with an OpenCLIP encoder; the 768px models predict v."""

from __future__ import annotations

from .sd1x import SD1xAdapter


class SD2xAdapter(SD1xAdapter):
    family = "sd2x"
    flavours = {
        "2.1": "stabilityai/stable-diffusion-2-1",
        "2.1-base": "stabilityai/stable-diffusion-2-1-base",
        "2.0": "stabilityai/stable-diffusion-2",
        "2.0-base": "stabilityai/stable-diffusion-2-base",
    }
    default_flavour = "2.1"
