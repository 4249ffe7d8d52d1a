"""Run SimpleTuner's shipped example configs through kubetuner, paths swapped, and print a table.

Each ``examples/<name>/config.json`` of a SimpleTuner release is read as a user would bring it:
its locations are swapped for local ones (output folder, a tiny model of its family, its dataset
list with every Hugging Face dataset replaced by a local folder of tiny images, or tiny clips for a
video dataset) and nothing else
is changed. ``kubetuner-train --print-config`` then either accepts it, or refuses it; a refusal is
counted as *unbuilt* when every problem names something kubetuner has not built, else as
*invalid* (a compatibility bug). With ``--train`` an accepted config of an implemented family
also trains one step on the tiny model of its flavour's layout (at a small resolution; with
``tread_config``, a tiny model with enough blocks for its routes).

Usage::

    python scripts/simpletuner_examples.py                  # downloads the pinned release from PyPI
    python scripts/simpletuner_examples.py --examples DIR   # an unpacked ``simpletuner/examples`` folder
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

SIMPLETUNER_RELEASE = "3.1.6"
#: frames SimpleTuner takes from a clip when a video dataset gives no num_frames (5 s at its 30 fps)
TINY_CLIP_FRAMES = 150
#: phrases of kubetuner's refusals that name something not built (options/registry and the loaders)
UNBUILT_PHRASES = ("does not implement", "does not support it yet", "not supported yet", "implements only",
                   "does not build yet")
#: SimpleTuner options holding a location the user swaps, other than the ones rewritten below
DROPPED_LOCATIONS = ("pretrained_t5_model_name_or_path", "pretrained_vae_model_name_or_path",
                     "pretrained_transformer_model_name_or_path", "pretrained_unet_model_name_or_path",
                     "user_prompt_library", "validation_prompt_library")


def download_examples(scratch: Path) -> Path:
    """``simpletuner/examples`` of the pinned release, from PyPI (``pip download``, no dependencies)."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(scratch),
                    f"simpletuner=={SIMPLETUNER_RELEASE}"], check=True)
    wheel = next(scratch.glob("simpletuner-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(scratch / "wheel", [n for n in archive.namelist() if n.startswith("simpletuner/examples/")])
    return scratch / "wheel" / "simpletuner" / "examples"


def swap_datasets(entries: list[dict[str, Any]], images: Path, cache: Path,
                  clips: Path | None = None) -> list[dict[str, Any]]:
    """The dataset list with its locations swapped: every image dataset reads ``images`` from disk, every
    video dataset ``clips`` (``images`` when None)."""
    swapped = []
    for i, entry in enumerate(entries):
        entry = dict(entry)
        kind = entry.get("dataset_type", "image")
        if kind in ("image", "conditioning", "video"):
            for key in ("dataset_name", "aws_bucket_name", "aws_data_prefix", "csv_file", "huggingface"):
                entry.pop(key, None)
            source = clips if kind == "video" and clips is not None else images
            entry.update(type="local", instance_data_dir=str(source))
            if entry.get("metadata_backend") in ("huggingface", "parquet"):
                entry["metadata_backend"] = "discovery"
            if entry.get("caption_strategy") in ("huggingface", "parquet", "csv"):
                entry["caption_strategy"] = "textfile"
        for key in [k for k in entry if k.startswith("cache_dir")]:
            entry[key] = str(cache / f"{i}-{key}")
        swapped.append(entry)
    return swapped


def swap_config(config: dict[str, Any], examples: Path, work: Path, images: Path, model: Path | None,
                clips: Path | None = None) -> Path:
    """Write ``config`` with its locations swapped into ``work``; returns the config file."""
    config = dict(config)
    config["output_dir"] = str(work / "out")
    config.pop("logging_dir", None)
    for key in DROPPED_LOCATIONS:
        config.pop(key, None)
    if model is not None:
        config["pretrained_model_name_or_path"] = str(model)
    if "lycoris_config" in config:
        config["lycoris_config"] = str(examples / Path(str(config["lycoris_config"])).name)
    datasets_file = examples / Path(str(config.get("data_backend_config", ""))).name
    entries = json.loads(datasets_file.read_text()) if datasets_file.is_file() else []
    (work / "datasets.json").write_text(json.dumps(swap_datasets(entries, images, work / "cache", clips)))
    config["data_backend_config"] = str(work / "datasets.json")
    (work / "config.json").write_text(json.dumps(config))
    return work / "config.json"


def _tiny_sizes(entry: dict[str, Any]) -> dict[str, Any]:
    """A dataset entry sized for the tiny images and models (64 px; video: 9-frame windows), its other settings
    kept."""
    entry = {k: v for k, v in entry.items() if k not in ("maximum_image_size", "target_downsample_size")}
    if entry.get("dataset_type", "image") in ("image", "conditioning", "video"):
        entry.update(resolution=64, resolution_type="pixel", minimum_image_size=0)
    if entry.get("dataset_type") == "video":
        entry["video"] = {**entry.get("video", {}), "num_frames": 9, "min_frames": 9}
    return entry


def deepen_for_routes(model: Path, family: str, tread_config: Any, flavour: str | None = None) -> Path:
    """Give a tiny model's denoiser enough blocks for an example's TREAD routes (tiny models have one or two
    per list; SimpleTuner's Wan example routes blocks up to 24): every ``*layers`` count of its config grows
    alike to the least that fits the routes, and the denoiser is saved again with random weights."""
    from kubetuner_trainer.models import family_class
    from kubetuner_trainer.training.tread import TreadConfigError, parse_tread_config, resolve_routes

    cls = family_class(family)
    folder = model / (cls.denoiser_subfolder(flavour) or cls.denoiser_name)  # the expert a flavour trains
    config = json.loads((folder / "config.json").read_text())
    counts = [k for k, v in config.items() if k.endswith("layers") and isinstance(v, int) and v > 0]
    routes = parse_tread_config(tread_config)
    for per_list in range(1, 65):
        try:
            resolve_routes(routes, per_list * len(counts))
        except TreadConfigError:
            continue
        if per_list <= min(config[k] for k in counts):
            return model
        denoiser = cls.denoiser_class().from_config({**config, **dict.fromkeys(counts, per_list)})
        denoiser.save_pretrained(folder)
        return model
    return model


def classify(code: int, stderr: str) -> tuple[str, str]:
    """(outcome, first problem) of one ``kubetuner-train`` call."""
    problems = [line.strip()[2:] for line in stderr.splitlines() if line.strip().startswith("- ")]
    if code == 0:
        return "accepted", ""
    if code == 78 and problems and all(any(p in line for p in UNBUILT_PHRASES) for line in problems):
        return "unbuilt", problems[0]
    return "invalid", problems[0] if problems else (stderr.strip().splitlines() or [f"exit {code}"])[-1]


def trainer(config: Path, *extra: str) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", "kubetuner_trainer.cli", "--config", str(config), *extra],
                          capture_output=True, text=True)
    return done.returncode, done.stderr


def run_example(folder: Path, examples: Path, work: Path, images: Path, *, train: bool,
                models: dict[tuple[str, str | None], Path], clips: Path | None = None) -> dict[str, Any]:
    """Swap, check and (with ``train``) train one example; ``models`` caches one tiny model per family."""
    from kubetuner_trainer.models.registry import implemented_families
    from kubetuner_trainer.tiny import build_tiny_model

    config = json.loads((folder / "config.json").read_text())
    family = str(config.get("model_family", ""))
    flavour = config.get("model_flavour")
    model = None
    if train and family in implemented_families():  # --print-config reads no weights: the Hub id may stay
        if config.get("tread_config"):  # deep enough for its routes: built for this example alone
            model = deepen_for_routes(build_tiny_model(family, work / "model", flavour=flavour), family,
                                      config["tread_config"], flavour)
        else:
            if (family, flavour) not in models:
                models[family, flavour] = build_tiny_model(family, work / "model", flavour=flavour)
            model = models[family, flavour]
    path = swap_config(config, examples, work, images, model, clips)
    outcome, problem = classify(*trainer(path, "--print-config"))
    if train and outcome == "accepted" and model is not None:
        small = {**json.loads(path.read_text()), "max_train_steps": 1, "num_train_epochs": 0, "resolution": 64,
                 "resolution_type": "pixel", "validation_disable": True, "metrics_port": 0}
        path.write_text(json.dumps(small))
        datasets = Path(small["data_backend_config"])
        datasets.write_text(json.dumps([_tiny_sizes(e) for e in json.loads(datasets.read_text())]))
        code, stderr = trainer(path)
        outcome, problem = ("trained", "") if code == 0 else classify(code, stderr)
    return {"example": folder.name, "family": family, "outcome": outcome, "problem": problem}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=Path, help="an unpacked simpletuner/examples folder (default: download)")
    parser.add_argument("--train", action="store_true", help="train one step on tiny models when accepted")
    parser.add_argument("--only", nargs="*", default=None, help="example folder names to run")
    args = parser.parse_args(argv)
    from kubetuner_trainer.tiny import build_tiny_dataset, build_tiny_video_dataset

    with tempfile.TemporaryDirectory(prefix="st-examples-") as scratch:
        root = Path(scratch)
        examples = args.examples or download_examples(root)
        images = build_tiny_dataset(root / "images", count=4, sizes=((64, 64),))
        # 128 px and 160 frames: what the video examples' own dataset settings keep (minimum_image_size 128,
        # num_frames unset: 5 s at 30 fps); --train trains them on 9-frame windows at 64 px
        clips = build_tiny_video_dataset(root / "clips", count=2, frames=TINY_CLIP_FRAMES + 10, sizes=((128, 128),))
        folders = sorted(p.parent for p in examples.glob("*/config.json"))
        models: dict[tuple[str, str | None], Path] = {}
        rows = [run_example(f, examples, Path(tempfile.mkdtemp(dir=root)), images, train=args.train, models=models,
                            clips=clips)
                for f in folders if args.only is None or f.name in args.only]
    width = max([len(r["example"]) for r in rows] + [7])
    print(f"{'example':<{width}}  {'family':<13} {'outcome':<9} first problem")
    for r in rows:
        print(f"{r['example']:<{width}}  {r['family']:<13} {r['outcome']:<9} {r['problem'][:110]}")
    counts = {k: sum(r["outcome"] == k for r in rows) for k in ("trained", "accepted", "unbuilt", "invalid")}
    print("totals: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 1 if counts["invalid"] else 0


if __name__ == "__main__":
    sys.exit(main())
