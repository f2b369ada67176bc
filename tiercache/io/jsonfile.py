"""Small JSON files replaced atomically (manifests, sidecars, caches): a reader sees the old
file or the new one, never a torn one."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import StoreError
from .segments import fsync_dir


def write_json_atomic(file: Path, doc: dict) -> None:
    """Atomically replace ``file`` with ``doc`` (write, fsync, rename, fsync the directory)."""
    tmp = file.with_name(f"{file.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
        fsync_dir(file.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot write {file}: {exc.strerror or exc}") from exc
