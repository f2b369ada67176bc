"""Where saved contexts live: the ``ContextBackend`` interface and its two backends, a local
``DiskStore`` directory (``DiskContexts``) and a Redis server shared by many processes and
machines (``tiercache.io.redis_store.RedisStore``). ``open_contexts`` picks one by its address.

A backend keeps each context as ordered records (``tiercache.io.record``: self-describing,
checksummed, naming the fingerprint of the KV) and answers a load with all of them or none: a
context partly written, partly evicted or damaged is never served in part. Beside the records
it keeps a small JSON description per context (what encoding measured), which may be lost
without harm.

A third backend, an S3-compatible object store, would implement the same methods (see the
README, "A shared context tier").
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Protocol, Sequence

from ..io.frames import StoreKey
from ..io.jsonfile import write_json_atomic
from ..io.redis_store import REDIS_SCHEMES, RedisStore
from ..io.store import DiskStore

#: The JSON description of a disk backend's contexts, beside its segments.
SIDECAR_NAME = "contexts-meta.json"


class ContextBackend(Protocol):
    """A store of saved contexts. Sizes in bytes."""

    @property
    def executor(self) -> ThreadPoolExecutor:
        """Threads for work next to the I/O: encoding records before a save, decoding after a load."""

    def save_context(self, name: str, records: Sequence[bytes | memoryview]) -> int:
        """Store the ordered ``records`` as context ``name``, replacing any earlier one, so that
        readers see the old context or the new one whole; return the bytes stored."""

    def load_context(self, name: str, verify: bool = True,
                     then: Callable[[StoreKey, memoryview, str], Any] | None = None) -> list[Any]:
        """The records of context ``name`` in order (``then(key, record, where)`` applied to each
        on the executor, ``where`` naming it for messages; ``verify=False`` leaves the checksum to
        ``then``). ``BlockNotFoundError`` if it is not stored whole, ``CorruptBlockError`` if a
        record fails its checks."""

    def has_context(self, name: str) -> bool: ...

    def contexts(self) -> list[str]:
        """Names of the stored contexts."""

    def delete_context(self, name: str) -> None:
        """Remove context ``name``; ``BlockNotFoundError`` if absent."""

    def context_meta(self, name: str) -> dict | None:
        """The description saved with ``put_context_meta`` (None if none is known)."""

    def put_context_meta(self, name: str, meta: dict) -> None:
        """Describe context ``name`` (JSON data)."""

    def close(self) -> None: ...


def open_contexts(where: str | os.PathLike, budget_bytes: int) -> ContextBackend:
    """The context backend at ``where``: a Redis address (``redis://host:port/db``, ``rediss://``,
    ``unix:///path?db=N``) or a directory (a ``DiskStore`` of ``budget_bytes``, created if
    missing; one writer at a time)."""
    if isinstance(where, str) and where.startswith(REDIS_SCHEMES):
        return RedisStore(where)
    return DiskContexts(where, budget_bytes)


class DiskContexts(DiskStore):
    """A ``DiskStore`` whose contexts are described in a JSON sidecar (``SIDECAR_NAME``) beside
    its segments."""

    def __init__(self, path: str | os.PathLike, budget_bytes: int, **options: Any) -> None:
        super().__init__(path, budget_bytes, **options)
        self._meta = self._read_sidecar()

    def context_meta(self, name: str) -> dict | None:
        return self._meta.get(name)

    def put_context_meta(self, name: str, meta: dict) -> None:
        self._meta[name] = meta
        live = {k: v for k, v in self._meta.items() if self.has_context(k)}
        write_json_atomic(self.path / SIDECAR_NAME, {"format": "tiercache-contexts", "version": 2,
                                                     "contexts": live})

    def _read_sidecar(self) -> dict[str, dict]:
        file = self.path / SIDECAR_NAME
        if not file.exists():
            return {}
        try:
            doc = json.loads(file.read_text(encoding="utf-8"))
            return {k: dict(v) for k, v in doc["contexts"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # Only descriptions are lost: the contexts themselves live in the store.
            print(f"tiercache: ignoring unreadable {file}: {exc!r}", file=sys.stderr)
            return {}

