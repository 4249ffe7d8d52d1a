"""Discovery on local disk and a real S3 endpoint: header-only sizes, EXIF, bad files, metadata cache."""

from __future__ import annotations

from pathlib import Path

from data_builders import S3_KEY, S3_SECRET, image_bytes, make_mixed_files, upload

from kubetuner_trainer.data.discovery import discover
from kubetuner_trainer.data.metadata import MetadataCache, probe_bytes
from kubetuner_trainer.data.storage import LocalStorage
from kubetuner_trainer.data.storage.s3 import S3Storage

EXPECTED_SIZES = {
    "square_red.png": (64, 64), "wide_one.png": (128, 64), "wide_two.jpg": (120, 60), "tall_one.png": (64, 128),
    "sub/tall_two.png": (60, 120), "rotated.jpg": (64, 96), "big_square.png": (256, 256),
    "pixels_cut.png": (80, 80),  # its header is intact; the damage shows only when decoding
}


def _check_mixed(found) -> None:
    assert {i.key: i.size for i in found.images} == EXPECTED_SIZES
    reasons = dict(found.skipped)
    assert set(reasons) == {"header_cut.png", "not_an_image.png"}
    assert all("not a readable image" in why for why in reasons.values())
    assert found.ignored == ["notes.bin"]
    rotated = next(i for i in found.images if i.key == "rotated.jpg")
    assert rotated.orientation == 6


def test_exif_orientation_swaps_width_and_height():
    assert probe_bytes(image_bytes(96, 64, orientation=6))[:2] == (64, 96)
    assert probe_bytes(image_bytes(96, 64, orientation=3))[:2] == (96, 64)


def test_local_discovery_and_metadata_cache(tmp_path, mixed_dir):
    store = LocalStorage(tmp_path / "meta")
    storage = LocalStorage(mixed_dir)
    first = discover(storage, MetadataCache(store, "mixed.json", "mixed", storage.describe()))
    _check_mixed(first)
    assert first.probed == 10
    again = discover(storage, MetadataCache(store, "mixed.json", "mixed", storage.describe()))
    _check_mixed(again)
    assert again.probed == 0  # nothing changed: nothing re-read
    (mixed_dir / "wide_one.png").write_bytes(image_bytes(200, 50, seed=4))
    changed = discover(storage, MetadataCache(store, "mixed.json", "mixed", storage.describe()))
    assert changed.probed == 1
    assert next(i.size for i in changed.images if i.key == "wide_one.png") == (200, 50)


def test_trusted_cache_skips_listing_and_other_location_is_not_reused(tmp_path, mixed_dir):
    store = LocalStorage(tmp_path / "meta")
    storage = LocalStorage(mixed_dir)
    discover(storage, MetadataCache(store, "m.json", "m", storage.describe()))
    (mixed_dir / "square_red.png").unlink()
    trusted = discover(storage, MetadataCache(store, "m.json", "m", storage.describe()), trust_cache=True)
    assert not trusted.listed and "square_red.png" in {i.key for i in trusted.images}
    fresh = discover(storage, MetadataCache(store, "m.json", "m", storage.describe()))
    assert "square_red.png" not in {i.key for i in fresh.images}
    moved = discover(storage, MetadataCache(store, "m.json", "m", "/elsewhere"))
    assert moved.probed == len(fresh.images) + len(fresh.skipped)


def test_delete_problematic_images_removes_only_bad_files(tmp_path, mixed_dir):
    storage = LocalStorage(mixed_dir)
    found = discover(storage, MetadataCache(None, "x.json", "x", storage.describe()), delete_problematic=True)
    assert not (mixed_dir / "header_cut.png").exists() and not (mixed_dir / "not_an_image.png").exists()
    assert all((mixed_dir / i.key).exists() for i in found.images)


def test_s3_discovery_uses_the_real_endpoint(tmp_path, s3_endpoint, s3_client, s3_bucket):
    upload(s3_client, s3_bucket, "data/set/", make_mixed_files())
    s3_client.put_object(Bucket=s3_bucket, Key="data/other/outside.png", Body=image_bytes(64, 64))
    storage = S3Storage(s3_bucket, "data/set", endpoint_url=s3_endpoint, region="us-east-1", access_key_id=S3_KEY,
                        secret_access_key=S3_SECRET, page_size=4)  # several listing pages
    store = LocalStorage(tmp_path / "meta")
    found = discover(storage, MetadataCache(store, "s3.json", "s3", storage.describe()))
    _check_mixed(found)
    again = discover(storage, MetadataCache(store, "s3.json", "s3", storage.describe()))
    assert again.probed == 0
    s3_client.put_object(Bucket=s3_bucket, Key="data/set/square_red.png", Body=image_bytes(32, 48, seed=9))
    changed = discover(storage, MetadataCache(store, "s3.json", "s3", storage.describe()))
    assert changed.probed == 1 and next(i.size for i in changed.images if i.key == "square_red.png") == (32, 48)


def test_large_exif_header_falls_back_to_full_read(tmp_path):
    # An EXIF block bigger than the first read forces the whole-file fallback.
    from io import BytesIO

    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 8
    exif[0x010E] = "x" * 65000  # ImageDescription
    out = BytesIO()
    Image.new("RGB", (50, 30)).save(out, format="JPEG", exif=exif.tobytes())
    path = tmp_path / "d" / "long_exif.jpg"
    path.parent.mkdir()
    path.write_bytes(out.getvalue() + b"\0" * 70000)
    storage = LocalStorage(path.parent)
    found = discover(storage, MetadataCache(None, "x", "x", "x"))
    assert [(i.key, i.size) for i in found.images] == [("long_exif.jpg", (30, 50))]


def test_local_write_is_atomic_and_leaves_no_temp(tmp_path):
    storage = LocalStorage(tmp_path)
    storage.write("a/b/c.bin", b"one")
    storage.write("a/b/c.bin", b"two")
    assert storage.read("a/b/c.bin") == b"two"
    assert [o.key for o in storage.list()] == ["a/b/c.bin"]
    assert sorted(p.name for p in Path(tmp_path / "a/b").iterdir()) == ["c.bin"]


def test_interrupted_discovery_keeps_what_it_probed(tmp_path):
    from data_builders import write_image

    for i in range(30):
        write_image(tmp_path / "many" / f"i{i:02d}.png", 32 + i, 32)
    storage = LocalStorage(tmp_path / "many")
    store = LocalStorage(tmp_path / "meta")

    class Crash(Exception):
        pass

    def crash_at(done: int, total: int) -> None:
        if done == total:  # the last probe: everything before it was saved (save_interval=0)
            raise Crash

    try:
        discover(storage, MetadataCache(store, "m.json", "m", storage.describe()), save_interval=0,
                 progress=crash_at)
    except Crash:
        pass
    else:  # pragma: no cover - the callback always raises
        raise AssertionError("discovery did not reach the crash point")
    resumed = discover(storage, MetadataCache(store, "m.json", "m", storage.describe()))
    assert len(resumed.images) == 30 and 1 <= resumed.probed < 30
