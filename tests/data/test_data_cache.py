"""Latent and text-embedding caches: reuse, invalidation, corruption, scans, on-demand, compression."""

from __future__ import annotations

import gzip
from pathlib import Path

import torch
from data_builders import PIPELINE_OPTIONS, TinyEncoders, write_config, write_image

from kubetuner_trainer.data import build_training_data
from kubetuner_trainer.data.cache import TextEmbedCache, unpack
from kubetuner_trainer.data.storage import LocalStorage


def _dataset(root: Path, count: int = 6) -> Path:
    for i in range(count):
        write_image(root / f"img{i:02d}.png", 64 + 16 * (i % 2), 64, seed=i)
    return root


def _cfg(tmp_path: Path, images: Path, *, entry: dict | None = None, **options) -> dict:
    entries = [{"id": "set", "type": "local", "instance_data_dir": str(images), **(entry or {})}]
    tmp_path.mkdir(parents=True, exist_ok=True)
    return {"data_backend_config": write_config(tmp_path / "datasets.json", entries),
            "cache_dir": str(tmp_path / "cache"), "resolution": 64, "aspect_bucket_alignment": 16,
            **PIPELINE_OPTIONS, **options}


def _entries(tmp_path: Path, suffix: str = ".safetensors") -> list[Path]:
    return sorted(p for p in (tmp_path / "cache" / "vae" / "set").rglob(f"*{suffix}"))


def test_cache_is_reused_and_invalidated_by_resolution_crop_and_model(tmp_path, tiny_models):
    images = _dataset(tmp_path / "images")
    first = TinyEncoders(tiny_models)
    data = build_training_data(_cfg(tmp_path, images), first)
    assert first.images_encoded == 6
    batch = next(iter(data))
    again = TinyEncoders(tiny_models)
    data = build_training_data(_cfg(tmp_path, images), again)
    assert again.images_encoded == 0 and again.prompts_encoded == 0  # everything came from the caches
    assert torch.equal(next(iter(data)).latents, batch.latents)

    bigger = TinyEncoders(tiny_models)
    data = build_training_data(_cfg(tmp_path, images, resolution=96), bigger)
    assert bigger.images_encoded == 6  # a new resolution never reuses old latents
    assert set(data.datasets[0].prepared.buckets.buckets) == {(96, 96), (112, 80)}  # 96*sqrt(1.25)=107 -> 112
    resized = next(iter(data))
    assert resized.latents.shape[-2:] == tuple(s // 2 for s in resized.target_sizes[0])

    cropped = TinyEncoders(tiny_models)
    build_training_data(_cfg(tmp_path, images, entry={"crop": True, "crop_aspect": "square"}), cropped)
    assert cropped.images_encoded == 3  # the three square images keep their geometry, the wide ones change

    other_model = TinyEncoders(tiny_models, cache_key="another-model")
    build_training_data(_cfg(tmp_path, images), other_model)
    assert other_model.images_encoded == 6 and other_model.prompts_encoded > 0


def test_corrupt_entry_is_recomputed_and_scan_removes_it(tmp_path, tiny_models):
    images = _dataset(tmp_path / "images")
    build_training_data(_cfg(tmp_path, images), TinyEncoders(tiny_models))
    victim = _entries(tmp_path)[0]
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 2])  # as a non-atomic writer killed mid-write would leave it

    lazy = TinyEncoders(tiny_models)
    data = build_training_data(_cfg(tmp_path, images), lazy)
    assert lazy.images_encoded == 0  # the name exists, so nothing is rebuilt up front ...
    for _, _batch in zip(range(data.steps_per_epoch), data, strict=False):
        pass
    assert lazy.images_encoded == 1  # ... but loading it fails, so it is encoded again, not trusted
    assert torch.allclose(unpack(victim.read_bytes())[0]["latents"], unpack(good)[0]["latents"], atol=1e-5)

    victim.write_bytes(b"garbage")
    scanning = TinyEncoders(tiny_models)
    build_training_data(_cfg(tmp_path, images, entry={"scan_for_errors": True}), scanning)
    assert scanning.images_encoded == 1 and unpack(victim.read_bytes())[1]["source"].startswith("img")


def test_scan_recreate_removes_stale_entries_and_sync_adopts_them(tmp_path, tiny_models):
    images = _dataset(tmp_path / "images")
    crop = {"crop": True, "crop_aspect": "square", "crop_style": "center"}
    build_training_data(_cfg(tmp_path, images, entry=crop), TinyEncoders(tiny_models))
    assert len(_entries(tmp_path)) == 6

    synced = TinyEncoders(tiny_models)
    data = build_training_data(_cfg(tmp_path, images, entry={**crop, "crop_style": "corner", "scan_for_errors": True},
                                    vae_cache_scan_behaviour="sync"), synced)
    assert synced.images_encoded == 0  # the wide images keep the center crop their entries were made with
    wide = [p for ps in data.datasets[0].prepared.buckets.buckets.values() for p in ps if p.original_size[0] == 80]
    assert wide and all(p.crop_left == 8 for p in wide)

    recreated = TinyEncoders(tiny_models)
    data = build_training_data(_cfg(tmp_path, images, entry={**crop, "crop_style": "corner", "scan_for_errors": True}),
                               recreated)
    assert recreated.images_encoded == 3
    assert len(_entries(tmp_path)) == 6  # the three stale center-crop entries were deleted
    wide = [p for ps in data.datasets[0].prepared.buckets.buckets.values() for p in ps if p.original_size[0] == 80]
    assert all(p.crop_left == 16 for p in wide)


def test_compressed_cache_round_trips(tmp_path, tiny_models):
    images = _dataset(tmp_path / "images")
    plain = build_training_data(_cfg(tmp_path / "plain", images), TinyEncoders(tiny_models))
    packed = build_training_data(_cfg(tmp_path, images, compress_disk_cache=True), TinyEncoders(tiny_models))
    entries = _entries(tmp_path, ".safetensors.gz")
    assert len(entries) == 6
    gzip.decompress(entries[0].read_bytes())  # really gzip
    text = list((tmp_path / "cache" / "text").rglob("*.safetensors.gz"))
    assert text
    assert torch.equal(next(iter(plain)).latents, next(iter(packed)).latents)


def test_on_demand_encodes_while_iterating(tmp_path, tiny_models):
    images = _dataset(tmp_path / "images")
    lazy = TinyEncoders(tiny_models)
    data = build_training_data(_cfg(tmp_path, images, vae_cache_ondemand=True), lazy)
    assert lazy.images_encoded == 0 and not _entries(tmp_path)
    first = next(iter(data))
    assert lazy.images_encoded == 1 and len(_entries(tmp_path)) == 1
    eager = build_training_data(_cfg(tmp_path / "eager", images), TinyEncoders(tiny_models))
    assert torch.allclose(first.latents, next(iter(eager)).latents, atol=1e-6)


def test_text_cache_is_keyed_by_model_and_caption(tmp_path, tiny_models):
    storage = LocalStorage(tmp_path / "text")
    encoders = TinyEncoders(tiny_models)
    cache = TextEmbedCache(storage, model_key=encoders.cache_key)
    assert cache.build(["a cat", "a dog", "a cat"], encoders) == 2
    assert TextEmbedCache(storage, model_key=encoders.cache_key).build(["a cat", "a dog"], encoders) == 0
    assert TextEmbedCache(storage, model_key="other").build(["a cat"], encoders) == 1
    direct = encoders.encode_prompts(["a dog"])[0]
    loaded = TextEmbedCache(storage, model_key=encoders.cache_key).get("a dog")
    assert torch.equal(loaded["prompt_embeds"], direct["prompt_embeds"])


class ConditioningEncoders(TinyEncoders):
    """A family whose encoder caches a conditioning tensor with the latents (as Wan image-to-video does)."""

    def encode_images(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        latents = super().encode_images(pixels)
        return {"latents": latents, "condition_latents": latents.flip(1) + 1.0}


def test_an_encoders_conditioning_tensors_are_cached_with_the_latents(tmp_path, tiny_models):
    images = _dataset(tmp_path / "images", count=4)
    built = build_training_data(_cfg(tmp_path, images, train_batch_size=2), ConditioningEncoders(tiny_models))
    first = next(iter(built))
    assert set(first.cached_conditioning) == {"condition_latents"}
    torch.testing.assert_close(first.cached_conditioning["condition_latents"], first.latents.flip(1) + 1.0)
    _, meta = unpack(_entries(tmp_path)[0].read_bytes())
    reader = ConditioningEncoders(tiny_models)  # a second start reads every tensor back from the cache
    again = next(iter(build_training_data(_cfg(tmp_path, images, train_batch_size=2), reader)))
    assert reader.images_encoded == 0 and meta["fingerprint"]
    assert torch.equal(again.latents, first.latents)
    assert torch.equal(again.cached_conditioning["condition_latents"], first.cached_conditioning["condition_latents"])
    plain = next(iter(build_training_data(_cfg(tmp_path / "plain", images, train_batch_size=2),
                                          TinyEncoders(tiny_models))))
    assert plain.cached_conditioning is None
