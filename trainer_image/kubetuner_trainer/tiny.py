"""Tiny but real models and datasets for the local example, benchmarks and tests.

No weights can be downloaded on CI or in an air-gapped cluster, yet every loading path
must run for real. The model builders (``models/tiny.py``) write a complete diffusers
folder; the dataset builder writes captioned images. Both are exposed on the command line:

    python -m kubetuner_trainer.tiny model sd1x ./tiny-sd
    python -m kubetuner_trainer.tiny model sdxl ./tiny-refiner --flavour refiner-1.0
    python -m kubetuner_trainer.tiny model qwen_image ./tiny-qwen-edit --flavour edit-v2
    python -m kubetuner_trainer.tiny dataset ./tiny-images --count 16
    python -m kubetuner_trainer.tiny dataset --video ./tiny-clips --count 4 --frames 9
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from .models.registry import implemented_families

_WORDS = ("red", "blue", "green", "yellow", "circle", "square", "stripes", "dots", "sky", "grass")


def build_tiny_model(family: str, out: Path, *, seed: int = 0, flavour: str | None = None) -> Path:
    """A random-weight model folder of ``family`` (of ``flavour``'s layout) in diffusers layout (``build_tiny``)."""
    from .models import family_class

    return family_class(family, flavour).for_flavour(flavour).build_tiny(Path(out), seed=seed)


def build_tiny_sd1x(out: Path, *, seed: int = 0) -> Path:
    return build_tiny_model("sd1x", out, seed=seed)


def build_tiny_dataset(out: Path, *, count: int = 16, seed: int = 0, sizes: tuple[tuple[int, int], ...] = ()) -> Path:
    """Captioned PNG images of coloured shapes (``image_N.png`` + ``image_N.txt``)."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    sizes = sizes or ((96, 96), (128, 96), (96, 128), (112, 112))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        width, height = sizes[index % len(sizes)]
        image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x0, y0 = rng.randrange(width // 2), rng.randrange(height // 2)
            box = (x0, y0, x0 + rng.randrange(8, width // 2), y0 + rng.randrange(8, height // 2))
            draw.ellipse(box, fill=tuple(rng.randrange(256) for _ in range(3)))
        image.save(out / f"image_{index:04d}.png")
        (out / f"image_{index:04d}.txt").write_text(" ".join(rng.sample(_WORDS, 3)))
    return out


def build_tiny_video_dataset(out: Path, *, count: int = 4, seed: int = 0, frames: int = 9, fps: int = 16,
                             sizes: tuple[tuple[int, int], ...] = ()) -> Path:
    """Captioned MP4 clips of a coloured disc moving over a background (``clip_N.mp4`` + ``clip_N.txt``).

    Each clip has ``frames`` frames at ``fps``; sizes cycle through ``sizes`` (even edges, as H.264 needs).
    """
    from PIL import Image, ImageDraw

    from .data.video import write_mp4

    rng = random.Random(seed)
    sizes = sizes or ((64, 48), (48, 64), (64, 64))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        width, height = sizes[index % len(sizes)]
        background = tuple(rng.randrange(256) for _ in range(3))
        colour = tuple(rng.randrange(256) for _ in range(3))
        x, y = rng.randrange(width // 2), rng.randrange(height // 2)
        dx, dy = rng.choice((-3, -2, 2, 3)), rng.choice((-3, -2, 2, 3))
        radius = max(4, min(width, height) // 6)
        clip = []
        for _ in range(frames):
            image = Image.new("RGB", (width, height), background)
            ImageDraw.Draw(image).ellipse((x, y, x + 2 * radius, y + 2 * radius), fill=colour)
            clip.append(image)
            x, y = (x + dx) % width, (y + dy) % height
        write_mp4(clip, out / f"clip_{index:04d}.mp4", fps)
        (out / f"clip_{index:04d}.txt").write_text(" ".join(rng.sample(_WORDS, 3)) + " moving")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetuner_trainer.tiny", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    model = sub.add_parser("model", help="write a tiny diffusers model folder")
    model.add_argument("family", choices=implemented_families())
    model.add_argument("out", type=Path)
    model.add_argument("--seed", type=int, default=0)
    model.add_argument("--flavour", help="a --model_flavour whose layout differs (e.g. sdxl refiner-1.0, "
                                         "qwen_image edit-v1 / edit-v2)")
    data = sub.add_parser("dataset", help="write a tiny captioned image (or, with --video, clip) folder")
    data.add_argument("out", type=Path)
    data.add_argument("--count", type=int, default=None, help="files to write (16 images or 4 clips)")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--video", action="store_true", help="write MP4 clips instead of images")
    data.add_argument("--frames", type=int, default=9, help="frames per clip (with --video)")
    data.add_argument("--fps", type=int, default=16, help="frame rate of the clips (with --video)")
    args = parser.parse_args(argv)
    if args.what == "model":
        from .models import family_class

        try:
            family_class(args.family, args.flavour)
        except ValueError as error:  # an unknown flavour: the registry's message lists the allowed ones
            parser.error(f"--flavour: {error}")
        print(build_tiny_model(args.family, args.out, seed=args.seed, flavour=args.flavour))
    elif args.video:
        print(build_tiny_video_dataset(args.out, count=args.count or 4, seed=args.seed, frames=args.frames,
                                       fps=args.fps))
    else:
        print(build_tiny_dataset(args.out, count=args.count or 16, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
