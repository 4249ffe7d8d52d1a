"""What the trainer would see in each dataset, without encoding anything (``kubetuner data inspect``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .buckets import SamplePlan, bucket_label
from .dataset_config import load_dataset_config
from .decode import UnreadableImage
from .prepare import PreparedDataset, drop_unusable, prepare_all
from .settings import DataSettings

SAMPLE_CAPTIONS = 3


def inspect_datasets(settings: DataSettings, *, environ: Mapping[str, str] | None = None,
                     use_metadata_cache: bool = False, verify: bool = True) -> dict[str, Any]:
    """A JSON-ready report of every enabled image or video dataset (discovery, skips, buckets, captions;
    for video datasets also the clips' frame counts, durations and frame rates, see ``_video_report``).

    Every usable image is decoded as the trainer's latent cache decodes it, and left out by the same rule
    (``prepare.drop_unusable``), so "usable" means what training will use. ``verify=False`` reads headers
    only (fast on large datasets); the report then says its counts are unverified.
    """
    if not settings.data_backend_config:
        raise ValueError("no dataset list given")
    config = load_dataset_config(settings.data_backend_config, settings)
    prepared = prepare_all(config, settings, environ=environ, write_metadata=use_metadata_cache)
    if verify:
        for item in prepared:
            _verify(item, settings)
    effective = settings.effective_batch_size
    datasets = [_dataset_report(p, effective) for p in prepared]
    for report, item in zip(datasets, prepared, strict=True):
        report["conditioning"] = _conditioning_report(config, item, settings, environ)
        missing = [c for c in report["conditioning"] if c["missing"]]
        if missing:
            report["batch_check"] = {"ok": False, "message": "training files without a conditioning pair in "
                                     + ", ".join(c["id"] for c in missing) + ": training refuses this (exit 78)"}
    disabled = [e.id for e in config.entries if e.disabled]
    return {
        "decoded": verify,
        "effective_batch": {
            "train_batch_size": settings.train_batch_size,
            "num_processes": settings.num_processes,
            "gradient_accumulation_steps": settings.gradient_accumulation_steps,
            "size": effective,
        },
        "datasets": datasets,
        "disabled": disabled,
        "ok": all(d["batch_check"]["ok"] for d in datasets),
    }


def _verify(item: PreparedDataset, settings: DataSettings) -> None:
    from .images import pixels_from_bytes  # torch is needed only to decode

    plans = [p for ps in item.buckets.buckets.values() for p in ps]

    def check(plan: SamplePlan) -> str | None:
        try:
            pixels_from_bytes(item.storage.read(plan.key), plan)
        except (UnreadableImage, OSError) as error:
            return str(error)
        return None

    with ThreadPoolExecutor(max_workers=max(1, settings.max_workers)) as pool:
        failures = [(p.key, why) for p, why in zip(plans, pool.map(check, plans), strict=True) if why]
    drop_unusable(item, sorted(failures), settings)


def _dataset_report(p: PreparedDataset, effective: int) -> dict[str, Any]:
    entry, buckets = p.entry, p.buckets
    samples = buckets.sample_count
    keys = sorted(plan.key for plans in buckets.buckets.values() for plan in plans)[:SAMPLE_CAPTIONS]
    ok = samples > 0
    noun = "clips" if entry.video is not None else "images"
    if ok:
        message = (f"{samples} {noun} x {buckets.repeats + 1} (repeats {buckets.repeats}) in "
                   f"{len(buckets.buckets)} buckets fill whole batches of {effective}")
    else:
        message = (f"no bucket reaches the effective batch of {effective}; add images, raise repeats, lower "
                   "--train_batch_size, or set disable_bucket_pruning / allow_dataset_oversubscription")
    return {
        "id": entry.id,
        "type": entry.type,
        "location": entry.location,
        "resolution": entry.resolution,
        "resolution_type": entry.resolution_type,
        "files_found": len(p.discovery.images) + len(p.discovery.skipped),
        "images_usable": samples,
        "repeats": buckets.repeats,
        "skipped": [{"file": key, "reason": reason} for key, reason in p.skipped],
        "ignored_files": list(p.discovery.ignored),
        "buckets": [{"size": bucket_label(b), "count": len(v)} for b, v in buckets.buckets.items()],
        "pruned_buckets": [{"size": bucket_label(b), "count": n} for b, n in sorted(buckets.pruned.items())],
        "caption_strategy": entry.caption_strategy,
        "sample_captions": [{"file": k, "caption": p.captions[k]} for k in keys],
        "warnings": list(buckets.warnings),
        "batch_check": {"ok": ok, "message": message},
        "video": _video_report(p) if entry.video is not None else None,
    }


def _conditioning_report(config: Any, item: PreparedDataset, settings: DataSettings,
                         environ: Mapping[str, str] | None) -> list[dict[str, Any]]:
    """The conditioning datasets linked to a training dataset: how many of its samples they pair, which lack
    a pair (first few) and how many conditioning files pair with nothing (see ``data/conditioning.py``)."""
    from .conditioning import SHOWN_MISSING, prepare_conditioning

    plans = [p for ps in item.buckets.buckets.values() for p in ps]
    out = []
    for entry in config.conditioning_for(item.entry):
        row: dict[str, Any] = {"id": entry.id, "location": entry.location,
                               "conditioning_type": entry.conditioning_type or "reference_strict",
                               "generated": entry.generator.get("type") if entry.generator else None}
        if entry.generator is not None:  # written when training starts; inspect writes nothing
            row.update(paired=len(plans), missing=[], missing_count=0, unpaired=0)
        else:
            found = prepare_conditioning(item.entry, plans, item.storage, entry, settings, environ=environ,
                                         check_pairs=False)
            missing = sorted({p.key for p in plans} - set(found.plans))
            row.update(paired=len(found.plans), missing=missing[:SHOWN_MISSING], missing_count=len(missing),
                       unpaired=len(found.unpaired))
        out.append(row)
    return out


def _video_report(p: PreparedDataset) -> dict[str, Any]:
    """Clip statistics of a video dataset: every readable clip found, and the frames training takes."""
    spec = p.entry.video
    assert spec is not None
    clips = p.discovery.images
    plans = [plan for plans in p.buckets.buckets.values() for plan in plans]
    durations = [c.duration for c in clips]
    rates = sorted({round(c.fps, 3) for c in clips})
    window = plans[0].frames if plans else None
    return {
        "clips_found": len(clips),
        "clips_usable": len(plans),
        "seconds_total": round(sum(durations), 3),
        "seconds_min": round(min(durations), 3) if durations else None,
        "seconds_max": round(max(durations), 3) if durations else None,
        "frames_min": min((c.frames for c in clips), default=None),
        "frames_max": max((c.frames for c in clips), default=None),
        "frame_rates": rates,
        "num_frames": window.count if window else spec.num_frames,
        "min_frames": spec.min_frames,
        "max_frames": spec.max_frames,
        "framerate": window.rate if window else None,
        "is_i2v": spec.is_i2v,
    }


def _format_video(v: dict[str, Any]) -> list[str]:
    rate = f"resampled to {v['framerate']:g} fps" if v["framerate"] else "at each clip's own rate"
    limit = f", max_frames {v['max_frames']}" if v["max_frames"] else ""
    return [f"  clips: {v['clips_found']} readable, {v['clips_usable']} usable; {v['seconds_total']:g} s in all "
            f"({v['seconds_min']} to {v['seconds_max']} s each, {v['frames_min']} to {v['frames_max']} frames)",
            f"  frame rates: {', '.join(f'{r:g}' for r in v['frame_rates']) or 'none'} fps",
            f"  training clips: {v['num_frames']} frames {rate} (min_frames {v['min_frames']}{limit}; "
            f"is_i2v {v['is_i2v'] if v['is_i2v'] is not None else 'unset: the family decides'})"]


def format_report(report: dict[str, Any]) -> str:
    eb = report["effective_batch"]
    lines = [f"effective batch: {eb['size']} = train_batch_size {eb['train_batch_size']} x processes "
             f"{eb['num_processes']} x gradient_accumulation_steps {eb['gradient_accumulation_steps']}"]
    if not report["decoded"]:
        lines.append("headers only: images were not decoded, so files damaged after their header still count "
                     "as usable (drop --headers-only to check them as training will)")
    for d in report["datasets"]:
        lines += ["", f"dataset {d['id']} ({d['type']}: {d['location']})",
                  f"  resolution {d['resolution']:g} ({d['resolution_type']})",
                  f"  files found: {d['files_found']}, usable {'clips' if d['video'] else 'images'}: "
                  f"{d['images_usable']}, repeats: {d['repeats']}"]
        if d["video"]:
            lines += _format_video(d["video"])
        for c in d.get("conditioning", []):
            how = f"generated ({c['generated']}) at training start" if c["generated"] else f"{c['paired']} pairs"
            lines.append(f"  conditioning {c['id']} ({c['conditioning_type']}: {c['location']}): {how}"
                         + (f", {c['unpaired']} files pair with nothing" if c["unpaired"] else ""))
            if c["missing_count"]:
                lines.append(f"    missing pairs ({c['missing_count']}): {', '.join(c['missing'])}")
        if d["buckets"]:
            lines.append("  buckets:")
            lines += [f"    {b['size']:>11}  {b['count']}" for b in d["buckets"]]
        if d["pruned_buckets"]:
            lines.append("  pruned buckets:")
            lines += [f"    {b['size']:>11}  {b['count']}" for b in d["pruned_buckets"]]
        if d["skipped"]:
            lines.append(f"  skipped ({len(d['skipped'])}):")
            lines += [f"    {s['file']}: {s['reason']}" for s in d["skipped"]]
        if d["ignored_files"]:
            kind = "videos" if d["video"] else "images"
            lines.append(f"  not {kind} ({len(d['ignored_files'])}): {', '.join(d['ignored_files'][:10])}")
        lines.append(f"  captions ({d['caption_strategy']}):")
        lines += [f"    {c['file']}: {c['caption']!r}" for c in d["sample_captions"]]
        lines += [f"  warning: {w}" for w in d["warnings"]]
        check = d["batch_check"]
        lines.append(f"  batch check: {'OK' if check['ok'] else 'PROBLEM'}: {check['message']}")
    if report["disabled"]:
        lines += ["", f"disabled: {', '.join(report['disabled'])}"]
    return "\n".join(lines)


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=False)
