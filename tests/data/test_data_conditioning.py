"""Conditioning datasets: pairing, pixel-exact alignment with the target's bucket and crop, caches, S3,
multi-dataset sampling (seeded, resumable), generated conditioning and text keyed on conditioning images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from data_builders import PIPELINE_OPTIONS, S3_KEY, S3_SECRET, upload, write_config
from PIL import Image

from kubetuner_trainer.config.errors import ConfigError
from kubetuner_trainer.data import build_training_data
from kubetuner_trainer.data.dataset_config import DatasetConfigError, load_dataset_config
from kubetuner_trainer.data.settings import DataSettings

# stored sizes: a wide, a tall and a square image (crops differ in both directions)
SIZES = {"wide.png": (150, 90), "tall.png": (90, 140), "sub/square.png": (100, 100)}
PERMUTATIONS = {"swap": [2, 0, 1], "flip": [1, 2, 0]}


class PixelEncoders:
    """Latents are the pixels themselves (downscale 1), so alignment is checked pixel for pixel."""

    latent_downscale = 1
    conditioning_needs_pixels = True
    text_uses_conditioning_images = False

    def __init__(self, cache_key: str = "pixels@test"):
        self.cache_key = cache_key
        self.images_encoded = 0
        self.with_images = 0

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        self.images_encoded += pixels.shape[0]
        return pixels.clone()

    def encode_prompts(self, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        return [{"prompt_embeds": torch.full((2, 3), float(len(p)))} for p in prompts]

    def encode_prompts_with_images(self, prompts, images):
        self.with_images += len(prompts)
        return [{"prompt_embeds": torch.stack([im.mean() for im in imgs]).repeat(2, 3)[:2, :3] + len(p)}
                for p, imgs in zip(prompts, images, strict=True)]


def _pattern(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array, "RGB").save(out, format="PNG")
    return out.getvalue()


def _files(permutation: list[int] | None = None) -> dict[str, bytes]:
    files = {}
    for i, (name, (w, h)) in enumerate(SIZES.items()):
        array = _pattern(w, h, i)
        files[name] = _png(array if permutation is None else array[..., permutation])
        if permutation is None:
            files[name.rsplit(".", 1)[0] + ".txt"] = f"caption {i}".encode()
    return files


def _write(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _cfg(tmp_path: Path, entries: list[dict], **options) -> dict:
    return {"data_backend_config": write_config(tmp_path / "datasets.json", entries),
            "cache_dir": str(tmp_path / "cache"), "resolution": 64, "resolution_type": "pixel",
            "aspect_bucket_alignment": 8, "seed": 5, **PIPELINE_OPTIONS, **options}


def _entries(tmp_path: Path, links: list[str], **target) -> list[dict]:
    train = _write(tmp_path / "train", _files())
    entries = [{"id": "train", "instance_data_dir": str(train), "caption_strategy": "textfile", "crop": True,
                "crop_style": "random", "crop_aspect": "preserve", "conditioning_data": links, **target}]
    for name in links:
        folder = _write(tmp_path / name, _files(PERMUTATIONS[name]))
        entries.append({"id": name, "dataset_type": "conditioning", "instance_data_dir": str(folder)})
    return entries


def _epoch(data) -> list:
    batches = []
    for batch in data:
        batches.append(batch)
        if len(batches) == data.steps_per_epoch * 2:
            return batches
    raise AssertionError("unreachable")


def test_conditioning_pixels_align_with_the_target_crop(tmp_path):
    encoders = PixelEncoders()
    data = build_training_data(_cfg(tmp_path, _entries(tmp_path, ["swap"])), encoders)
    batches = _epoch(data)
    crops = set()
    for batch in batches:
        (cond,), (pixels,) = batch.conditioning_latents, batch.conditioning_pixels
        assert cond.shape == batch.latents.shape
        # the conditioning file is the target with its channels permuted: the same crop gives the same pixels
        assert torch.equal(cond, batch.latents[:, PERMUTATIONS["swap"]])
        assert torch.equal(pixels, cond)
        assert batch.conditioning_type == "reference_strict"
        assert batch.conditioning_paths[0][0].endswith(batch.paths[0].split("/train/", 1)[1])
        crops.add(batch.crop_coords[0])
    assert len(crops) > 1  # the random crops really moved the window


def test_a_missing_pair_is_a_configuration_error_naming_the_files(tmp_path):
    entries = _entries(tmp_path, ["swap"])
    (tmp_path / "swap" / "tall.png").unlink()
    with pytest.raises(DatasetConfigError) as caught:
        build_training_data(_cfg(tmp_path, entries), PixelEncoders())
    message = str(caught.value)
    assert "datasets[swap]" in message and "tall.png" in message and "dataset train" in message
    assert isinstance(caught.value, ConfigError)  # exit 78


def test_conditioning_cache_keys_differ_from_the_targets_and_are_reused(tmp_path):
    # the conditioning dataset is a byte-identical copy: only the namespace keeps the entries apart
    entries = _entries(tmp_path, ["swap"])
    _write(tmp_path / "swap", _files())
    shared = str(tmp_path / "shared-vae")
    entries[0]["cache_dir_vae"] = entries[1]["cache_dir_vae"] = shared
    encoders = PixelEncoders()
    build_training_data(_cfg(tmp_path, entries), encoders)
    stored = sorted(p.name for p in Path(shared).rglob("*.safetensors"))
    assert len(stored) == 2 * len(SIZES) and encoders.images_encoded == 2 * len(SIZES)
    assert not [p for p in Path(shared).rglob("*") if p.is_file() and not p.name.endswith(".safetensors")]
    again = PixelEncoders()
    build_training_data(_cfg(tmp_path, entries), again)
    assert again.images_encoded == 0


def test_s3_conditioning_dataset(tmp_path, s3_endpoint, s3_client, s3_bucket):
    upload(s3_client, s3_bucket, "train/", _files())
    upload(s3_client, s3_bucket, "edits/", _files(PERMUTATIONS["flip"]))
    s3 = {"type": "aws", "aws_bucket_name": s3_bucket, "aws_endpoint_url": s3_endpoint,
          "aws_region_name": "us-east-1", "aws_access_key_id": S3_KEY, "aws_secret_access_key": S3_SECRET}
    entries = [{"id": "train", "aws_data_prefix": "train/", "caption_strategy": "textfile",
                "conditioning_data": "edits", **s3},
               {"id": "edits", "dataset_type": "conditioning", "aws_data_prefix": "edits/",
                "cache_dir_vae": "cache/edits", **s3}]
    data = build_training_data(_cfg(tmp_path, entries), PixelEncoders())
    batch = next(iter(data))
    assert torch.equal(batch.conditioning_latents[0], batch.latents[:, PERMUTATIONS["flip"]])
    assert batch.conditioning_paths[0][0].startswith(f"s3://{s3_bucket}/edits/")
    listed = s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="cache/edits/")
    assert listed["KeyCount"] == len(SIZES)  # its latents live in its own bucket


def _slots(batches) -> list[tuple[str, ...]]:
    return [tuple(p.split("/")[-2] if "/sub/" not in p else p.split("/")[-3] for p in slot)
            for b in batches for slot in b.conditioning_paths]


def test_random_sampling_is_seeded_and_resumes_exactly(tmp_path):
    entries = _entries(tmp_path, ["swap", "flip"])
    cfg = _cfg(tmp_path, entries, conditioning_multidataset_sampling="random")
    first = _epoch(build_training_data(cfg, PixelEncoders()))
    assert all(len(b.conditioning_latents) == 1 for b in first)
    for batch in first:  # the drawn dataset's permutation is the one in the latents
        which = batch.conditioning_paths[0][0].split(str(tmp_path))[1].split("/")[1]
        assert torch.equal(batch.conditioning_latents[0], batch.latents[:, PERMUTATIONS[which]])
    assert len(set(_slots(first))) == 2  # both datasets are drawn
    again = _epoch(build_training_data(cfg, PixelEncoders()))
    assert [b.conditioning_paths for b in again] == [b.conditioning_paths for b in first]
    data = build_training_data(cfg, PixelEncoders())
    iterator = iter(data)
    for _ in range(2):
        next(iterator)
    state = data.state_dict()
    resumed = build_training_data(cfg, PixelEncoders())
    resumed.load_state_dict(state)
    rest = [b for _, b in zip(range(len(first) - 2), resumed, strict=False)]
    assert [b.conditioning_paths for b in rest] == [b.conditioning_paths for b in first[2:]]
    assert all(torch.equal(a.conditioning_latents[0], b.conditioning_latents[0]) for a, b in zip(rest, first[2:], strict=True))


def test_combined_sampling_feeds_every_linked_dataset_in_order(tmp_path):
    entries = _entries(tmp_path, ["flip", "swap"])
    data = build_training_data(_cfg(tmp_path, entries, conditioning_multidataset_sampling="combined"), PixelEncoders())
    batch = next(iter(data))
    flip, swap = batch.conditioning_latents
    assert torch.equal(flip, batch.latents[:, PERMUTATIONS["flip"]])
    assert torch.equal(swap, batch.latents[:, PERMUTATIONS["swap"]])


def test_generated_superresolution_is_written_once_and_aligned(tmp_path):
    train = _write(tmp_path / "train", _files())
    entries = [{"id": "train", "instance_data_dir": str(train), "caption_strategy": "textfile", "crop": True,
                "crop_style": "center", "conditioning": {"type": "superresolution", "blur_radius": 1.5}}]
    data = build_training_data(_cfg(tmp_path, entries), PixelEncoders())
    folder = tmp_path / "cache" / "conditioning_data" / "train_conditioning_superresolution"
    written = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*.png")}
    assert sorted(written) == sorted(SIZES)
    batch = next(iter(data))
    (cond,) = batch.conditioning_latents
    assert cond.shape == batch.latents.shape and not torch.equal(cond, batch.latents)
    assert (cond - batch.latents).abs().mean() < 0.5  # a degraded copy of the same crop, not another image
    for path in folder.rglob("*.png"):
        path.unlink()
    build_training_data(_cfg(tmp_path, entries), PixelEncoders())
    assert {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*.png")} == written  # seeded


@pytest.mark.parametrize("kind", ["depth", "segmentation", "optical_flow"])
def test_generated_types_needing_a_model_are_refused_by_name(kind):
    with pytest.raises(DatasetConfigError, match=f"{kind}.*not supported yet"):
        load_dataset_config([{"id": "a", "instance_data_dir": "/x", "conditioning": {"type": kind}}], DataSettings())


def test_links_must_name_conditioning_entries():
    with pytest.raises(DatasetConfigError, match=r"datasets\[a\]\.conditioning_data.*dataset_type 'conditioning'"):
        load_dataset_config([{"id": "a", "instance_data_dir": "/x", "conditioning_data": ["b"]},
                             {"id": "b", "instance_data_dir": "/y"}], DataSettings())


def test_text_embeddings_are_keyed_on_the_conditioning_images(tmp_path):
    entries = _entries(tmp_path, ["swap"])
    for name in SIZES:  # one caption for every image: only the conditioning image tells them apart
        (tmp_path / "train" / name).with_suffix(".txt").write_text("same")
    encoders = PixelEncoders()
    encoders.text_uses_conditioning_images = True
    data = build_training_data(_cfg(tmp_path, entries), encoders)
    assert encoders.with_images == len(SIZES)  # pre-built, one per (caption, conditioning image)
    embeds = {tuple(b.text["prompt_embeds"].flatten().tolist()) for b in _epoch(data)}
    assert len(embeds) == len(SIZES) and encoders.with_images == len(SIZES)


def test_inspect_reports_pairs_and_missing_pairs(tmp_path, capsys):
    from kubetuner_operator.cli import main

    entries = _entries(tmp_path, ["swap"])
    (tmp_path / "swap" / "wide.png").unlink()
    (tmp_path / "swap" / "extra.png").write_bytes(_png(_pattern(70, 70, 9)))
    code = main(["data", "inspect", write_config(tmp_path / "datasets.json", entries), "--resolution=64",
                 "--aspect_bucket_alignment=8", "--train_batch_size=1", "--headers-only"])
    out = capsys.readouterr().out
    assert code == 1 and "batch check: PROBLEM" in out
    assert "conditioning swap (reference_strict" in out and "2 pairs, 1 files pair with nothing" in out
    assert "missing pairs (1): wide.png" in out


@pytest.mark.parametrize("kind", ["superresolution", "jpeg", "random_masks", "canny"])
def test_generators_keep_the_size_and_are_seeded_per_file(kind):
    from kubetuner_trainer.data.generated import generate

    image = Image.fromarray(np.kron(_pattern(8, 6, 1), np.ones((8, 8, 1), dtype=np.uint8)), "RGB")  # 64x48 blocks
    out = generate(kind, image, {"type": kind}, seed=1, dataset_id="d", key="a.png")
    assert out.size == image.size and out.mode == "RGB"
    assert np.array_equal(np.asarray(out), np.asarray(generate(kind, image, {"type": kind}, seed=1, dataset_id="d",
                                                               key="a.png")))
    values = np.unique(np.asarray(out))
    if kind in ("canny", "random_masks"):  # edge maps and masks are black and white
        assert set(values.tolist()) <= {0, 255} and len(values) == 2
    else:
        assert not np.array_equal(np.asarray(out), np.asarray(image))


def test_text_entries_of_different_lengths_are_zero_padded_to_the_longest():
    from kubetuner_trainer.data.pipeline import _stack_padded

    short, long = torch.ones(2, 3), torch.full((4, 3), 2.0)
    stacked = _stack_padded([short, long])
    assert stacked.shape == (2, 4, 3) and torch.equal(stacked[0, :2], short) and stacked[0, 2:].abs().sum() == 0
    masks = _stack_padded([torch.ones(2, dtype=torch.long), torch.ones(4, dtype=torch.long)])
    assert masks.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert torch.equal(_stack_padded([short, short]), torch.stack([short, short]))
