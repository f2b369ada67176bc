"""Where tiercache keeps files of its own: converted models, cached weight hashes, the demo's
store (``$TIERCACHE_HOME``, default ``~/.cache/tiercache``)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    """Directory where tiercache keeps converted models and caches (``$TIERCACHE_HOME`` or
    ~/.cache/tiercache)."""
    return Path(os.environ.get("TIERCACHE_HOME", Path.home() / ".cache" / "tiercache"))
