"""Sampler: exact resume, disjoint ranks, repeats, weighting, epochs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from data_builders import TinyEncoders, write_config, write_image

from kubetuner_trainer.data import build_training_data
from kubetuner_trainer.data.buckets import SamplePlan
from kubetuner_trainer.data.sampler import DatasetSamples, Sampler


def _plans(prefix: str, count: int, size=(64, 64)) -> list[SamplePlan]:
    return [SamplePlan(f"{prefix}{i:03d}", "v", size, size, 0, 0, size) for i in range(count)]


def _datasets() -> list[DatasetSamples]:
    return [DatasetSamples("big", {(64, 64): _plans("big-sq", 24), (96, 48): _plans("big-w", 9, (96, 48))}),
            DatasetSamples("small", {(64, 64): _plans("small", 8)}, repeats=1)]


def _epoch(sampler: Sampler) -> list:
    it = iter(sampler)
    return [next(it) for _ in range(sampler.steps_per_epoch)]


def test_epoch_covers_every_full_batch_once_with_repeats():
    sampler = Sampler(_datasets(), batch_size=4, seed=1)
    batches = _epoch(sampler)
    assert sampler.steps_per_epoch == 6 + 2 + 4  # 24/4 + 9//4 + 16/4
    assert sampler.epoch == 1 and sampler.position == 0
    counts = Counter(p.key for b in batches for p in b.plans)
    assert all(counts[f"big-sq{i:03d}"] == 1 for i in range(24))
    assert all(counts[f"small{i:03d}"] == 2 for i in range(8))  # repeats=1: twice per epoch
    assert sum(1 for k in counts if k.startswith("big-w")) == 8  # one short tail left for a later epoch
    for b in batches:
        assert len({p.target_size for p in b.plans}) == 1
    second = _epoch(sampler)
    assert [p.key for b in second for p in b.plans] != [p.key for b in batches for p in b.plans]


def test_state_round_trip_replays_identical_batches_across_epochs():
    sampler = Sampler(_datasets(), batch_size=4, seed=7)
    it = iter(sampler)
    for _ in range(9):
        next(it)
    state = sampler.state_dict()
    expected = [next(it) for _ in range(10)]  # crosses into epoch 1
    restored = Sampler(_datasets(), batch_size=4, seed=7)
    restored.load_state_dict(state)
    it2 = iter(restored)
    assert [next(it2) for _ in range(10)] == expected


def test_ranks_are_disjoint_and_cover_the_same_batches():
    seen = []
    for rank in (0, 1):
        sampler = Sampler(_datasets(), batch_size=2, world_size=2, rank=rank, seed=3)
        batches = _epoch(sampler)
        seen.append(batches)
    assert len(seen[0]) == len(seen[1])
    for a, b in zip(*seen, strict=True):
        assert a.dataset_index == b.dataset_index and a.plans[0].target_size == b.plans[0].target_size
    keys0 = {p.key for b in seen[0] for p in b.plans if p.key.startswith("big")}
    keys1 = {p.key for b in seen[1] for p in b.plans if p.key.startswith("big")}
    assert not keys0 & keys1
    assert len(keys0) + len(keys1) == 24 + 8


def test_probability_zero_and_weighting():
    datasets = [DatasetSamples("a", {(64, 64): _plans("a", 40)}),
                DatasetSamples("b", {(64, 64): _plans("b", 8)}),
                DatasetSamples("off", {(64, 64): _plans("off", 8)}, probability=0)]
    auto = _epoch(Sampler(datasets, batch_size=4, seed=2))
    assert {b.dataset_index for b in auto} == {0, 1}

    def mean_position(batches, index):
        spots = [i for i, b in enumerate(batches) if b.dataset_index == index]
        return sum(spots) / len(spots)

    # uniform picks the small dataset as often as the big one, so it runs out early in the epoch;
    # auto-weighting spreads it over the epoch in proportion to its size.
    uniform_positions = [mean_position(_epoch(Sampler(datasets, batch_size=4, seed=s, sampling="uniform")), 1)
                         for s in range(20)]
    auto_positions = [mean_position(_epoch(Sampler(datasets, batch_size=4, seed=s)), 1) for s in range(20)]
    assert sum(uniform_positions) < sum(auto_positions)
    with pytest.raises(ValueError, match="auto-weighting, uniform"):
        Sampler(datasets, batch_size=4, sampling="random")


def test_small_bucket_is_filled_when_pruning_is_disabled():
    sampler = Sampler([DatasetSamples("tiny", {(64, 64): _plans("t", 3)})], batch_size=4, seed=0,
                      fill_small_buckets=True)
    (batch,) = _epoch(sampler)
    assert len(batch.plans) == 4 and {p.key for p in batch.plans} == {"t000", "t001", "t002"}


def _pipeline_cfg(tmp_path: Path, **options) -> dict:
    images = tmp_path / "images"
    if not images.exists():
        for i in range(10):
            write_image(images / f"sq{i}.png", 64, 64, seed=i)
        for i in range(6):
            write_image(images / f"wide{i}.png", 128, 64, seed=50 + i)
    return {"data_backend_config": write_config(tmp_path / "datasets.json", [
        {"id": "set", "instance_data_dir": str(images)}]), "cache_dir": str(tmp_path / "cache"), "resolution": 64,
        "aspect_bucket_alignment": 16, "train_batch_size": 2, "seed": 11, "caption_dropout_probability": 0.3,
        **options}


@pytest.mark.parametrize("prefetch", [False, True])
def test_training_data_resume_gives_identical_batches(tmp_path, tiny_models, prefetch):
    cfg = _pipeline_cfg(tmp_path, dataloader_prefetch=prefetch, dataloader_prefetch_qlen=3)
    data = build_training_data(cfg, TinyEncoders(tiny_models))
    assert data.steps_per_epoch == 8
    it = iter(data)
    for _ in range(5):
        next(it)
    state = data.state_dict()
    assert (state["epoch"], state["position"]) == (0, 5)  # consumed batches, not what prefetch built ahead
    expected = [next(it) for _ in range(6)]
    data.close()
    assert data.data_wait_seconds > 0

    resumed = build_training_data(cfg, TinyEncoders(tiny_models))
    resumed.load_state_dict(state)
    got = [b for _, b in zip(range(6), resumed, strict=False)]
    resumed.close()
    assert [b.paths for b in got] == [b.paths for b in expected]
    assert [b.captions for b in got] == [b.captions for b in expected]
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a.latents, b.latents) and torch.equal(a.text["prompt_embeds"], b.text["prompt_embeds"])
    assert got[-1].epoch == 1


def test_caption_dropout_uses_the_empty_prompt(tmp_path, tiny_models):
    encoders = TinyEncoders(tiny_models)
    data = build_training_data(_pipeline_cfg(tmp_path, caption_dropout_probability=1.0), encoders)
    batch = next(iter(data))
    empty = encoders.encode_prompts([""])[0]["prompt_embeds"]
    assert batch.captions == ["", ""]
    assert torch.allclose(batch.text["prompt_embeds"][0], empty)


def test_two_ranks_of_the_pipeline_see_disjoint_samples(tmp_path, tiny_models):
    cfg = _pipeline_cfg(tmp_path, caption_dropout_probability=0.0)
    ranks = [build_training_data(cfg, TinyEncoders(tiny_models), rank=r, world_size=2) for r in (0, 1)]
    assert ranks[0].steps_per_epoch == ranks[1].steps_per_epoch == 3  # 10//4 + 6//4 global batches
    seen = [{p for _, b in zip(range(d.steps_per_epoch), d, strict=False) for p in b.paths} for d in ranks]
    assert len(seen[0]) == len(seen[1]) == 6 and not seen[0] & seen[1]
