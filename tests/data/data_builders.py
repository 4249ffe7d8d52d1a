"""Builders shared by the data tests and bench/data_pipeline.py: images, tiny encoders."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# -- images ---------------------------------------------------------------------------------------


# Values the pipeline tests' assertions are written for (exact captions, plain cache files, batches
# of one), pinned so that a change of the catalog's defaults does not change what they test.
PIPELINE_OPTIONS = {"caption_dropout_probability": 0.0, "compress_disk_cache": False, "train_batch_size": 1}


def image_bytes(width: int, height: int, *, fmt: str = "PNG", seed: int = 0, orientation: int | None = None) -> bytes:
    """A deterministic noisy image; ``orientation`` writes that EXIF tag (JPEG only)."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    image = Image.fromarray(array, "RGB")
    out = io.BytesIO()
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(out, format="JPEG", exif=exif.tobytes(), quality=90)
    else:
        image.save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def write_image(path: Path, width: int, height: int, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(width, height, **kwargs))
    return path


# The mixed dataset the discovery tests use: (relative path, width, height, extra kwargs).
# Sizes are as stored; rotated.jpg is stored 96x64 with EXIF orientation 6, i.e. 64x96 upright.
MIXED_IMAGES = [
    ("square_red.png", 64, 64, {}),
    ("wide_one.png", 128, 64, {}),
    ("wide_two.jpg", 120, 60, {"fmt": "JPEG"}),
    ("tall_one.png", 64, 128, {}),
    ("sub/tall_two.png", 60, 120, {}),
    ("rotated.jpg", 96, 64, {"orientation": 6}),
    ("big_square.png", 256, 256, {}),
]


def make_mixed_files(seed: int = 0) -> dict[str, bytes]:
    """File name -> content of the mixed dataset, including broken and non-image files."""
    files = {name: image_bytes(w, h, seed=seed + i, **kw) for i, (name, w, h, kw) in enumerate(MIXED_IMAGES)}
    whole = image_bytes(64, 64, seed=99)
    files["header_cut.png"] = whole[:20]  # cut inside the header: discovery cannot read it
    files["pixels_cut.png"] = image_bytes(80, 80, seed=98)[:300]  # header fine, pixel data cut off
    files["not_an_image.png"] = b"this is plain text pretending to be a png"
    files["notes.bin"] = b"\x00\x01 binary notes"
    for name in list(files):
        if name.endswith((".png", ".jpg")):
            files[name.rsplit(".", 1)[0] + ".txt"] = f"caption of {name.rsplit('.', 1)[0]}".encode()
    return files


def build_tiny_models(root: Path) -> Path:
    """A tiny AutoencoderKL, CLIP text encoder and tokenizer saved with save_pretrained under ``root``."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=64)
    vae.save_pretrained(root / "vae")
    text = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                        num_hidden_layers=1, vocab_size=100, max_position_embeddings=32,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    text.save_pretrained(root / "text_encoder")
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt")).save_pretrained(root / "tokenizer")
    return root


class TinyEncoders:
    """The ``Encoders`` contract over the tiny models, loaded the way an adapter would load them."""

    latent_downscale = 2

    def __init__(self, root: Path | str, cache_key: str = "tiny-sd@test"):
        root = Path(root)
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTokenizer

        self.cache_key = cache_key
        self.vae = AutoencoderKL.from_pretrained(root / "vae").eval()
        self.text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder").eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
        self.images_encoded = 0
        self.prompts_encoded = 0

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        self.images_encoded += pixels.shape[0]
        with torch.no_grad():
            return self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor

    def encode_prompts(self, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        self.prompts_encoded += len(prompts)
        tokens = self.tokenizer(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
        with torch.no_grad():
            out = self.text_encoder(tokens.input_ids)
        return [{"prompt_embeds": out.last_hidden_state[i], "pooled_prompt_embeds": out.pooler_output[i]}
                for i in range(len(prompts))]


S3_KEY, S3_SECRET = "testing-key-id", "testing-secret-key"


def upload(client, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}{name}", Body=data)


def write_config(path: Path, entries: list[dict]) -> str:
    path.write_text(json.dumps(entries))
    return str(path)
