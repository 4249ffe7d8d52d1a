"""The one way the trainer gives its output files their permissions, and checks it can write them.

Some writers create files readable by their owner only: safetensors' ``save_file`` (and so every
``save_pretrained``) writes a temporary file with mode 0600 and renames it into place, as does
``tempfile.mkstemp``. Another pod or tool reading the output volume under a different UID then
gets "permission denied". Every file the trainer writes ends with :data:`OUTPUT_FILE_MODE`, the
mode ``open()`` gives under the usual umask 022.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: rw for the owner, readable by group and others
OUTPUT_FILE_MODE = 0o644


def publish(path: str | os.PathLike[str]) -> None:
    """Give ``path`` (a file, or every file under a folder) :data:`OUTPUT_FILE_MODE`."""
    root = Path(path)
    files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    for file in files:
        if file.stat().st_mode & 0o777 != OUTPUT_FILE_MODE:
            os.chmod(file, OUTPUT_FILE_MODE)


def save_safetensors(tensors: Mapping[str, Any], path: str | os.PathLike[str],
                     metadata: Mapping[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` with the output file mode (it alone would leave 0600)."""
    from safetensors.torch import save_file

    save_file(dict(tensors), str(path), metadata=dict(metadata) if metadata is not None else None)
    publish(path)
    return Path(path)


def writable_problem(path: str | os.PathLike[str]) -> str | None:
    """Why this process could not create files in the folder ``path``, or ``None`` when it can.

    A missing folder is judged by its nearest existing parent (it will be created there); an
    existing one by writing and removing a probe file (``os.access`` alone trusts root too much on
    network filesystems). Creates nothing that stays.
    """
    folder = Path(path).expanduser().absolute()
    existing = folder
    try:
        while not existing.exists() and existing.parent != existing:
            existing = existing.parent
    except OSError as exc:  # a parent this user may not enter
        return f"{existing} cannot be reached by this user (uid {os.geteuid()}): {exc.strerror or exc}"
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    effective = os.access in os.supports_effective_ids  # the uid that writes, not the one that started us
    if not os.access(existing, os.W_OK | os.X_OK, effective_ids=effective):
        readonly = hasattr(os, "ST_RDONLY") and os.statvfs(existing).f_flag & os.ST_RDONLY
        where = "is on a read-only filesystem" if readonly else f"is not writable by this user (uid {os.geteuid()})"
        return f"{existing} {where}"
    if existing == folder:
        try:
            fd, probe = tempfile.mkstemp(prefix=".kubetuner-write-check-", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            return f"{folder} is not writable ({exc.strerror or exc})"
    return None
