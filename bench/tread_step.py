"""TREAD routing benchmark: the time of one training forward+backward pass with and without ``--tread_config``.

The family's tiny model is loaded through the user's code path, then its denoiser is rebuilt from its
own config with ``--layers`` blocks per block list and ``--heads`` attention heads (random weights,
every parameter trained), so the routed share of the work is that of a deep transformer. Both modes
run the same weights on the same random latents and prompts, alternating, and the median of the
timed passes is reported. Routes are SimpleTuner's ``tread_config`` format.

    python bench/tread_step.py --family flux --resolution 128 --layers 4 --heads 4 --steps 3
    python bench/tread_step.py --family wan --resolution 256 --frames 2 --layers 8 --heads 4 \\
        --routes '{"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}]}'
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from kubetuner_trainer.config import TrainerConfig
from kubetuner_trainer.models import load_family
from kubetuner_trainer.tiny import build_tiny_model
from kubetuner_trainer.training.tread import TokenRouter, parse_tread_config, routable_families

DEFAULT_ROUTES = '{"routes": [{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": -2}]}'


def build(family_name: str, workdir: Path, layers: int, heads: int | None, model: Path | None = None):
    """The family loaded from its tiny model (``model``, else one built in ``workdir``), its denoiser rebuilt
    deeper and wider (random weights)."""
    folder = model or build_tiny_model(family_name, workdir / family_name)
    cfg = TrainerConfig.from_mapping({"model_family": family_name, "pretrained_model_name_or_path": str(folder),
                                      "output_dir": str(workdir / "out")}, require=False)
    family = load_family(cfg)
    config = dict(family.denoiser.config)
    counts = {k: layers for k, v in config.items() if k.endswith("layers") and isinstance(v, int) and v > 0}
    if heads and "num_attention_heads" in config:
        counts["num_attention_heads"] = heads
    family.components.denoiser = type(family.denoiser).from_config({**config, **counts}).train()
    return family


def inputs(family, resolution: int, frames: int, batch: int):
    """Random noisy latents of the family's shape, mid-range timesteps on its scale, encoded prompts."""
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(batch, 3, resolution, resolution, generator=gen) * 2 - 1
    shape = list(family.encoders().encode_images(pixels).shape)  # the family's latent layout
    if family.is_video:
        shape[2] = frames  # [B, C, F, h, w]
    latents = torch.randn(shape, generator=gen)
    steps = family.objective.sample_timesteps(latents, gen)
    return latents, steps, family.encode_text(["a photo of a cat"] * batch)


def time_pass(family, latents, steps, text) -> float:
    """Seconds of one training forward and backward pass (all parameters trained)."""
    started = time.perf_counter()
    pred = family.predict(family.denoiser, latents, steps, text, None)
    pred.float().square().mean().backward()
    family.denoiser.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def run(args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tread-bench-") as scratch:
        for family_name in args.family.split(","):
            family = build(family_name, Path(scratch), args.layers, args.heads, args.model)
            latents, steps, text = inputs(family, args.resolution, args.frames, args.batch)
            routes = parse_tread_config(args.routes)
            router = TokenRouter(family, family.denoiser, routes, torch.Generator().manual_seed(0))
            timings: dict[bool, list[float]] = {False: [], True: []}
            for index in range(args.warmup + args.steps):
                for routed in (False, True):
                    if routed:
                        router.install()
                    seconds = time_pass(family, latents, steps, text)
                    router.remove()
                    if index >= args.warmup:
                        timings[routed].append(seconds)
            plain, routed = (statistics.median(timings[k]) for k in (False, True))
            rows.append({"family": family_name, "resolution": args.resolution, "batch": args.batch,
                         "blocks": len(router.blocks), "routes": "; ".join(
                             f"{r.selection_ratio:g}@{r.start_layer_idx}-{r.end_layer_idx}" for r in router.routes),
                         "plain_ms": plain * 1e3, "routed_ms": routed * 1e3, "speedup": plain / routed})
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'family':<13} {'res':>5} {'batch':>5} {'blocks':>6}  {'routes':<22} {'plain ms':>9} "
             f"{'routed ms':>9} {'speedup':>7}"]
    lines += [f"{r['family']:<13} {r['resolution']:>5} {r['batch']:>5} {r['blocks']:>6}  {r['routes']:<22} "
              f"{r['plain_ms']:>9.1f} {r['routed_ms']:>9.1f} {r['speedup']:>6.2f}x" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="flux", help=f"comma-separated; routable: {', '.join(routable_families())}")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--frames", type=int, default=2, help="latent frames of a video family")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=4, help="blocks per block list of the rebuilt denoiser")
    parser.add_argument("--heads", type=int, default=None, help="attention heads of the rebuilt denoiser (default: "
                                                                 "the tiny model's; SD3 ties other widths to it)")
    parser.add_argument("--routes", default=DEFAULT_ROUTES, help="a tread_config (SimpleTuner's format)")
    parser.add_argument("--steps", type=int, default=6, help="timed passes per mode")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--model", type=Path, default=None, help="a tiny model folder of the (one) family to use "
                                                                   "instead of building one")
    parser.add_argument("--output", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    text = table(run(args))
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
