"""Checkpoint folders: atomic writing, integrity manifest, discovery for resume, pruning, LoRA files.

Layout of ``<output_dir>/checkpoint-<step>/``::

    pytorch_lora_weights.safetensors   (LoRA)   or   <denoiser>/ [+ <denoiser>_ema/, text_encoder*/]  (full)
    optimizer.pt  scheduler.pt  [ema.pt]  rank-<r>.pt (RNG + data sampler state per process)
    training_state.json  manifest.json  COMPLETE

Everything is written into ``.tmp-checkpoint-<step>`` first; ``manifest.json`` lists every file
with its size and sha256; the folder is renamed into place and ``COMPLETE`` is written last.
On resume a folder without ``COMPLETE`` or whose files do not match the manifest is skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, Problem
from ..contract import CHECKPOINT_COMPLETE_MARKER, checkpoint_folder, checkpoint_folders
from ..files import publish, save_safetensors

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
COMPLETE = CHECKPOINT_COMPLETE_MARKER  # shared with the operator side through the contract
STATE_FILE = "training_state.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
#: the final LoRA in diffusers keys, written first when ``--lora_format`` asks for another format
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.diffusers.safetensors"
_ENV_RE = re.compile(r"\{env:([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass
class TrainingState:
    """Where the run stands; enough to continue exactly where it stopped."""

    global_step: int = 0
    epoch: int = 0  # 0-based epoch in progress
    batches_in_epoch: int = 0  # batches consumed in the current epoch (all ranks alike)
    samples_seen: int = 0  # across all processes
    world_size: int = 1
    kind: str = "interval"  # interval | rolling | epoch | final | interrupt
    model_type: str = "lora"
    model_family: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainingState:
        data = json.loads(text)
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def checkpoint_path(output_dir: Path, step: int) -> Path:
    """``<output_dir>/checkpoint-<step>`` (:func:`~kubetuner_trainer.contract.checkpoint_folder`)."""
    return checkpoint_folder(output_dir, step)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_manifest(folder: Path) -> dict[str, Any]:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel in (MANIFEST, COMPLETE):
            continue
        files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return {"version": 1, "files": files}


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())


def begin_checkpoint(output_dir: Path, step: int) -> Path:
    """The temporary folder all processes write into (removed first if a crash left one)."""
    tmp = Path(output_dir) / f".tmp-checkpoint-{step}"
    return tmp


def finish_checkpoint(output_dir: Path, step: int) -> Path:
    """Manifest, fsync, rename into place, then the completion marker. Main process only."""
    tmp = begin_checkpoint(output_dir, step)
    final = checkpoint_path(output_dir, step)
    publish(tmp)  # whatever wrote into it, every file ends group/other-readable
    manifest = build_manifest(tmp)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    marker = {"step": step, "manifest_sha256": _sha256(final / MANIFEST)}
    (final / COMPLETE).write_text(json.dumps(marker))
    return final


def verify_checkpoint(folder: Path) -> str | None:
    """``None`` when the checkpoint is complete and intact, else why not."""
    if not (folder / COMPLETE).is_file():
        return "it has no completion marker (the write was interrupted)"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        marker = json.loads((folder / COMPLETE).read_text())
    except (OSError, ValueError) as exc:
        return f"its manifest or marker is unreadable ({exc})"
    if marker.get("manifest_sha256") != _sha256(folder / MANIFEST):
        return "its manifest does not match the completion marker"
    for rel, meta in manifest.get("files", {}).items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != meta["size"]:
            return f"{rel} has {path.stat().st_size} bytes, the manifest says {meta['size']}"
        if _sha256(path) != meta["sha256"]:
            return f"{rel} does not match its sha256 in the manifest"
    return None


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """``checkpoint-<step>`` folders, complete or not, oldest first (:func:`~kubetuner_trainer.contract.checkpoint_folders`)."""
    return checkpoint_folders(output_dir)


def find_resume_checkpoint(output_dir: Path, resume_from: str | None) -> Path | None:
    """Resolve ``--resume_from_checkpoint``: ``latest`` picks the newest intact checkpoint.

    Broken checkpoints are skipped with a warning; an explicitly named one must be intact, or
    :class:`ConfigError` says which and why (retrying cannot repair it).
    """
    if not resume_from:
        return None
    if resume_from == "latest":
        for step, folder in reversed(list_checkpoints(output_dir)):
            problem = verify_checkpoint(folder)
            if problem is None:
                return folder
            log.warning("skipping checkpoint-%d for resume: %s", step, problem)
        log.info("no usable checkpoint in %s; starting from scratch", output_dir)
        return None
    folder = named_checkpoint(output_dir, resume_from)
    problem = verify_checkpoint(folder) if folder.is_dir() else "it is not a checkpoint folder"
    if problem:
        raise ConfigError([Problem("resume_from_checkpoint", resume_from, f"{folder} cannot be used: {problem}")])
    return folder


def named_checkpoint(output_dir: Path, resume_from: str) -> Path:
    """The folder an explicit ``--resume_from_checkpoint`` names (a path, or a name in ``output_dir``)."""
    folder = Path(resume_from).expanduser()
    if not folder.is_absolute() and not folder.exists():
        folder = Path(output_dir) / resume_from
    return folder


def read_state(folder: Path) -> TrainingState:
    """The ``training_state.json`` of a checkpoint folder (or of ``output_dir``'s final model)."""
    return TrainingState.from_json((folder / STATE_FILE).read_text())


def read_final_state(output_dir: Path) -> TrainingState | None:
    """Where the final model in ``output_dir`` stands, or ``None`` when there is none that says."""
    try:
        state = read_state(Path(output_dir))
    except (OSError, ValueError, TypeError):
        return None
    return state if state.kind == "final" else None


def prune_checkpoints(output_dir: Path, *, total_limit: int | None, rolling_limit: int | None,
                      keep: Path | None = None) -> list[Path]:
    """Remove the oldest checkpoints beyond each kind's limit (rolling ones count separately)."""
    removed: list[Path] = []
    regular, rolling = [], []
    for _step, folder in list_checkpoints(output_dir):
        kind = "interval"
        try:
            kind = read_state(folder).kind
        except (OSError, ValueError):
            pass
        (rolling if kind == "rolling" else regular).append(folder)
    for group, limit in ((regular, total_limit), (rolling, rolling_limit)):
        if not limit:
            continue
        excess = len(group) - limit
        for folder in group[: max(0, excess)]:
            if keep is not None and folder == keep:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
            log.info("removed old checkpoint %s (limit %d)", folder.name, limit)
    return removed


def due_kind(step: int, *, step_interval: int | None, rolling_interval: int | None) -> str | None:
    """Which kind of checkpoint (if any) is due after optimizer step ``step``."""
    if step_interval and step % step_interval == 0:
        return "interval"
    if rolling_interval and step % rolling_interval == 0:
        return "rolling"
    return None


# ----- safetensors metadata -----------------------------------------------------------------------

def expand_env(text: str, environ: Mapping[str, str] | None = None) -> str:
    """Replace ``{env:NAME}`` with that environment variable (empty, with a warning, when unset)."""
    env = os.environ if environ is None else environ

    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in env:
            log.warning("modelspec_comment refers to {env:%s}, which is not set", name)
            return ""
        return env[name]

    return _ENV_RE.sub(sub, text)


def modelspec_metadata(cfg: Any, *, architecture: str, title: str, lora: bool,
                       environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``modelspec.*`` keys for safetensors headers (what model viewers display).

    ``architecture`` is the family's ``modelspec_architecture``.
    """
    arch = architecture
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch}/lora" if lora else arch,
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
    }
    if cfg.modelspec_comment:
        meta["modelspec.comment"] = expand_env(str(cfg.modelspec_comment), environ)
    return meta


def lora_file_contents(family: Any, per_module: dict[str, dict[str, torch.Tensor]],
                       adapter_meta: dict[str, dict[str, Any]], *, lora_format: str,
                       metadata: dict[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (CPU, contiguous) and header of a LoRA file in diffusers or ComfyUI key format.

    Raises ValueError when a key has no name in ``lora_format``.
    """
    from .lora import flatten_with_prefix, to_comfyui

    tensors_cpu = {n: {k: v.detach().cpu().contiguous() for k, v in sd.items()} for n, sd in per_module.items()}
    header = {"format": "pt", **metadata}
    if lora_format == "comfyui":
        alphas = {n: float(m["lora_alpha"]) for n, m in adapter_meta.items()}
        return to_comfyui(family, tensors_cpu, alphas), header
    header["lora_adapter_metadata"] = json.dumps(
        {f"{n}.{k}": _jsonable(v) for n, m in adapter_meta.items() for k, v in m.items()},
        sort_keys=True,
    )
    return flatten_with_prefix(tensors_cpu), header


def save_lora_file(folder: Path, family: Any, per_module: dict[str, dict[str, torch.Tensor]],
                   adapter_meta: dict[str, dict[str, Any]], *, lora_format: str,
                   metadata: dict[str, str], filename: str = LORA_FILE) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` (or ``filename``) in diffusers or ComfyUI key format."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors, header = lora_file_contents(family, per_module, adapter_meta, lora_format=lora_format,
                                         metadata=metadata)
    return save_safetensors(tensors, folder / filename, header)


def _jsonable(value: Any) -> Any:
    if isinstance(value, set):
        return sorted(value)
    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(value)


def load_safetensors_folder(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of every ``*.safetensors`` file in a saved model folder."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no .safetensors weights")
    for f in files:
        state.update(load_file(str(f)))
    return state


def write_torch(path: Path, obj: Any) -> None:
    torch.save(obj, path)


def read_torch(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False)


def run_atomic(output_dir: Path, step: int, write: Callable[[Path], None]) -> Path:
    """Single-process helper: write into the temp folder then finish the checkpoint."""
    tmp = begin_checkpoint(output_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    return finish_checkpoint(output_dir, step)
