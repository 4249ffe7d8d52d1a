"""Tiny but real models and datasets, built locally from small configs.

No weights can be downloaded on CI or in an air-gapped cluster, yet every loading path
must run for real. These builders write a complete diffusers folder (``model_index.json``
plus component subfolders) and a small captioned image folder, so that the local example
and the benchmarks exercise exactly the code users run against hub checkpoints.

    python -m kubetuner_trainer.tiny model sd1x ./tiny-sd
    python -m kubetuner_trainer.tiny dataset ./tiny-images --count 16
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE tokenizers use for raw bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable] + [chr(256 + i) for i in range(len(extra))]


def write_tiny_clip_tokenizer(folder: Path) -> Path:
    """A character-level CLIP tokenizer (no merges): every text is tokenizable, vocab of 514."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    raw = folder / "_raw"
    raw.mkdir(exist_ok=True)
    (raw / "vocab.json").write_text(json.dumps(vocab))
    (raw / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(raw / "vocab.json"), str(raw / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(folder)
    for file in raw.iterdir():
        file.unlink()
    raw.rmdir()
    return folder


def build_tiny_sd1x(out: Path, *, seed: int = 0, sample_size: int = 32) -> Path:
    """A Stable Diffusion 1.x-architecture pipeline with a few thousand parameters per component."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=16,
        sample_size=sample_size * 2,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=514,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
        )
    )
    out = Path(out)
    tokenizer_dir = write_tiny_clip_tokenizer(out / "_tokenizer_build")
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        clip_sample=False,
    )
    pipeline = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(out)
    for file in tokenizer_dir.iterdir():
        file.unlink()
    tokenizer_dir.rmdir()
    return out


MODEL_BUILDERS = {"sd1x": build_tiny_sd1x}

_WORDS = ("red", "blue", "green", "yellow", "circle", "square", "stripes", "dots", "sky", "grass")


def build_tiny_dataset(out: Path, *, count: int = 16, seed: int = 0, sizes: tuple[tuple[int, int], ...] = ()) -> Path:
    """Captioned PNG images of coloured shapes (``image_N.png`` + ``image_N.txt``)."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    sizes = sizes or ((96, 96), (128, 96), (96, 128), (112, 112))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        width, height = sizes[index % len(sizes)]
        background = tuple(rng.randrange(256) for _ in range(3))
        image = Image.new("RGB", (width, height), background)
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x0, y0 = rng.randrange(width // 2), rng.randrange(height // 2)
            box = (x0, y0, x0 + rng.randrange(8, width // 2), y0 + rng.randrange(8, height // 2))
            draw.ellipse(box, fill=tuple(rng.randrange(256) for _ in range(3)))
        image.save(out / f"image_{index:04d}.png")
        caption = " ".join(rng.sample(_WORDS, 3))
        (out / f"image_{index:04d}.txt").write_text(caption)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetuner_trainer.tiny", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    model = sub.add_parser("model", help="write a tiny diffusers model folder")
    model.add_argument("family", choices=sorted(MODEL_BUILDERS))
    model.add_argument("out", type=Path)
    model.add_argument("--seed", type=int, default=0)
    data = sub.add_parser("dataset", help="write a tiny captioned image folder")
    data.add_argument("out", type=Path)
    data.add_argument("--count", type=int, default=16)
    data.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.what == "model":
        print(MODEL_BUILDERS[args.family](args.out, seed=args.seed))
    else:
        print(build_tiny_dataset(args.out, count=args.count, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
