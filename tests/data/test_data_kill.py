"""A process killed (SIGKILL) in the middle of building the latent cache leaves nothing corrupt behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from data_builders import PIPELINE_OPTIONS, TinyEncoders, write_config, write_image

from kubetuner_trainer.data import build_training_data
from kubetuner_trainer.data.cache import unpack

CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {helpers!r})
    from data_builders import TinyEncoders
    from kubetuner_trainer.data import build_training_data

    class Announcing(TinyEncoders):
        def encode_images(self, pixels):
            out = super().encode_images(pixels)
            print("ENCODED", self.images_encoded, flush=True)
            if self.images_encoded == 4:
                sys.stdin.readline()  # park here, mid-build, until the parent kills us
            return out

    build_training_data({cfg!r}, Announcing({models!r}))
    print("FINISHED", flush=True)
""")


def test_sigkill_mid_build_leaves_only_complete_entries(tmp_path, tiny_models):
    images = tmp_path / "images"
    for i in range(12):
        write_image(images / f"img{i:02d}.png", 64, 64, seed=i)
    cfg = {"data_backend_config": write_config(tmp_path / "datasets.json",
                                               [{"id": "set", "instance_data_dir": str(images)}]),
           "cache_dir": str(tmp_path / "cache"), "resolution": 64, "aspect_bucket_alignment": 16,
           "vae_batch_size": 1, "write_batch_size": 1, "max_workers": 2, **PIPELINE_OPTIONS}
    code = CHILD.format(helpers=str(Path(__file__).parent), cfg=cfg, models=str(tiny_models))
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        for line in child.stdout:
            assert not line.startswith("FINISHED")
            if line.strip() == "ENCODED 4":
                break
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()

    cache = tmp_path / "cache" / "vae" / "set"
    finished = sorted(cache.rglob("*.safetensors"))
    assert 0 < len(finished) < 12
    for path in finished:  # every entry under its final name is complete
        tensors, meta = unpack(path.read_bytes())
        assert tensors["latents"].shape == (4, 32, 32) and meta["source"].startswith("img")

    leftovers = [p for p in cache.rglob("*") if p.is_file() and p.suffix != ".safetensors"]
    for path in leftovers:  # temp files of a killed writer are never listed nor loaded; old ones get removed
        assert ".kt-tmp-" in path.name
        os.utime(path, (0, 0))

    resumed = TinyEncoders(tiny_models)
    data = build_training_data(cfg, resumed)
    assert resumed.images_encoded == 12 - len(finished)
    before = resumed.images_encoded
    paths = [p for _, batch in zip(range(data.steps_per_epoch), data, strict=False) for p in batch.paths]
    assert len(paths) == 12
    assert resumed.images_encoded == before  # every entry loaded; nothing had to be recomputed
    assert not [p for p in cache.rglob("*") if ".kt-tmp-" in p.name]
