"""The one way the trainer gives its output files their permissions.

Some writers create files readable by their owner only: safetensors' ``save_file`` (and so every
``save_pretrained``) writes a temporary file with mode 0600 and renames it into place, as does
``tempfile.mkstemp``. Another pod or tool reading the output volume under a different UID then
gets "permission denied". Every file the trainer writes ends with :data:`OUTPUT_FILE_MODE`, the
mode ``open()`` gives under the usual umask 022.
"""

from __future__ import annotations

import os
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
