"""Benchmark the data pipeline against the simplest correct approach.

Three measurements, each "ours" vs. "baseline" in images/s:

1. discovery + bucketing on local disk: ours reads headers only, in parallel, and keeps a metadata cache
   (cold = first run, warm = unchanged data); the baseline opens every file with PIL serially, decodes it
   (which also catches truncated files), applies EXIF orientation and buckets it.
2. the same on an S3 endpoint (a moto server on loopback, real HTTP): ours lists and fetches only the
   first bytes of each object concurrently; the baseline lists and downloads every object serially.
3. latent-cache building with a tiny AutoencoderKL: ours reads ahead on threads, encodes in batches and
   writes in batches; the baseline loads, encodes and saves one image at a time.

Usage: python bench/data_pipeline.py [--count 20000] [--vae-count 500] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "data"))

from data_builders import TinyEncoders, build_tiny_models  # noqa: E402

from kubetuner_trainer.data.buckets import assign_buckets, plan_sample  # noqa: E402
from kubetuner_trainer.data.cache import LatentCache  # noqa: E402
from kubetuner_trainer.data.dataset_config import parse_dataset_config  # noqa: E402
from kubetuner_trainer.data.discovery import discover  # noqa: E402
from kubetuner_trainer.data.images import pixels_from_bytes  # noqa: E402
from kubetuner_trainer.data.metadata import ImageInfo, MetadataCache  # noqa: E402
from kubetuner_trainer.data.settings import DataSettings  # noqa: E402
from kubetuner_trainer.data.storage import LocalStorage  # noqa: E402
from kubetuner_trainer.data.storage.s3 import S3Storage  # noqa: E402

KEY, SECRET = "bench-key", "bench-secret"


def _one_image(i: int) -> tuple[str, bytes]:
    rng = np.random.default_rng(i)
    width, height = (int(v) for v in rng.integers(64, 257, size=2))
    base = np.linspace(0, 255, width, dtype=np.uint8)[None, :, None].repeat(height, 0).repeat(3, 2)
    base = (base + rng.integers(0, 40, size=(1, 1, 3), dtype=np.uint8)).astype(np.uint8)
    image = Image.fromarray(base, "RGB")
    out = io.BytesIO()
    if i % 3 == 0:
        image.save(out, format="PNG", compress_level=1)
        name = f"d{i % 50:02d}/img{i:06d}.png"
    else:
        exif = Image.Exif()
        if i % 10 == 1:
            exif[0x0112] = 6
        image.save(out, format="JPEG", quality=85, exif=exif.tobytes())
        name = f"d{i % 50:02d}/img{i:06d}.jpg"
    return name, out.getvalue()


def generate(root: Path, count: int) -> dict[str, bytes]:
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        files = dict(pool.map(_one_image, range(count)))
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def baseline_bucket_local(root: Path, entry) -> int:
    plans = 0
    for folder, _dirs, names in sorted(os.walk(root)):
        for name in sorted(names):
            path = Path(folder) / name
            try:
                with Image.open(path) as image:
                    image.load()
                    upright = ImageOps.exif_transpose(image)
                    size = upright.size
            except (OSError, SyntaxError):
                continue
            key = str(path.relative_to(root))
            plans += not isinstance(plan_sample(ImageInfo(key, "v", *size), entry, alignment=16), str)
    return plans


def baseline_bucket_s3(client, bucket: str, prefix: str, entry) -> int:
    plans = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", ()):
            data = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            try:
                with Image.open(io.BytesIO(data)) as image:
                    image.load()
                    size = ImageOps.exif_transpose(image).size
            except (OSError, SyntaxError):
                continue
            plans += not isinstance(plan_sample(ImageInfo(item["Key"], "v", *size), entry, alignment=16), str)
    return plans


def ours_bucket(storage, meta_root: Path, entry, label: str) -> tuple[int, int]:
    meta = MetadataCache(LocalStorage(meta_root), f"{label}.json", label, storage.describe())
    found = discover(storage, meta, workers=32)
    result = assign_buckets(found.images, entry, alignment=16)
    return result.sample_count, found.probed


def _progress(rows) -> None:
    for name, count, ours, base in rows:
        print(f"{name}: ours {ours:.1f}s, baseline {base:.1f}s for {count} images", flush=True)


def timed(fn, *args):
    start = time.perf_counter()
    value = fn(*args)
    return time.perf_counter() - start, value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20000, help="images to generate (default 20000)")
    parser.add_argument("--vae-count", type=int, default=500, help="images for the latent-cache part")
    parser.add_argument("--workdir", help="where to put generated data (default: a temp dir, removed after)")
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kt-bench-"))
    images = work / "images"
    rows: list[tuple[str, int, float, float]] = []
    entry = parse_dataset_config([{"id": "bench", "instance_data_dir": str(images), "resolution": 64}],
                                 DataSettings()).entries[0]
    try:
        t, files = timed(generate, images, args.count)
        print(f"generated {len(files)} images in {t:.1f}s", flush=True)

        t_base, n_base = timed(baseline_bucket_local, images, entry)
        t_cold, (n_ours, _) = timed(ours_bucket, LocalStorage(images), work / "meta", entry, "local")
        t_warm, (n_warm, probed) = timed(ours_bucket, LocalStorage(images), work / "meta", entry, "local")
        assert n_base == n_ours == n_warm == args.count and probed == 0, (n_base, n_ours, n_warm, probed)
        rows += [("discovery+bucketing, local, cold", args.count, t_cold, t_base),
                 ("discovery+bucketing, local, warm metadata cache", args.count, t_warm, t_base)]
        _progress(rows[-2:])

        import boto3
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=KEY,
                              aws_secret_access_key=SECRET)
        client.create_bucket(Bucket="bench")
        storage = S3Storage("bench", "set", endpoint_url=endpoint, region="us-east-1", access_key_id=KEY,
                            secret_access_key=SECRET, max_pool_connections=32)
        t, _ = timed(lambda: storage.write_many((f"{k}", v) for k, v in files.items()))
        print(f"uploaded to S3 in {t:.1f}s", flush=True)
        t_base, n_base = timed(baseline_bucket_s3, client, "bench", "set/", entry)
        t_cold, (n_ours, _) = timed(ours_bucket, storage, work / "meta", entry, "s3")
        t_warm, (n_warm, probed) = timed(ours_bucket, storage, work / "meta", entry, "s3")
        assert n_base == n_ours == n_warm == args.count and probed == 0
        rows += [("discovery+bucketing, S3 (loopback), cold", args.count, t_cold, t_base),
                 ("discovery+bucketing, S3 (loopback), warm metadata cache", args.count, t_warm, t_base)]
        _progress(rows[-2:])
        server.stop()

        import torch

        torch.set_num_threads(os.cpu_count() or 2)
        models = build_tiny_models(work / "models")
        encoders = TinyEncoders(models)
        local = LocalStorage(images)
        found = discover(local, MetadataCache(None, "x", "x", "x"), workers=32)
        plans = [p for ps in assign_buckets(found.images[: args.vae_count], entry, alignment=16).buckets.values()
                 for p in ps]

        def baseline_cache() -> None:
            out = work / "baseline-cache"
            out.mkdir(exist_ok=True)
            for i, plan in enumerate(plans):
                pixels = pixels_from_bytes((images / plan.key).read_bytes(), plan)
                with torch.no_grad():
                    latents = encoders.encode_images(pixels[None])[0]
                torch.save(latents, out / f"{i}.pt")

        def ours_cache() -> None:
            cache = LatentCache(LocalStorage(work / "vae"), model_key="tiny", latent_downscale=2)
            report = cache.build(plans, local, encoders, batch_size=32, workers=8, write_batch=64)
            assert report.encoded == len(plans), report

        t_base, _ = timed(baseline_cache)
        t_ours, _ = timed(ours_cache)
        rows.append((f"latent cache build (tiny VAE, {entry.resolution:g}px pixel_area)", len(plans), t_ours, t_base))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    header = f"{'stage':58} {'images':>7} {'ours img/s':>11} {'baseline img/s':>15} {'ratio':>7}"
    print("\n" + header + "\n" + "-" * len(header))
    for name, count, ours, base in rows:
        print(f"{name:58} {count:7d} {count / ours:11.0f} {count / base:15.0f} {base / ours:6.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
