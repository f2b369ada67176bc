"""Where saved contexts live: the ``ContextBackend`` interface and its two backends, a local
``DiskStore`` directory kept as a cache (``DiskContexts``: the least recently used contexts are
evicted when a save does not fit) and a Redis server shared by many processes and machines
(``tiercache.io.redis_store.RedisStore``; its ``maxmemory`` policy evicts there).
``open_contexts`` picks one by its address.

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
from .eviction import LruEviction

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
    """A ``DiskStore`` kept as a cache of saved contexts: a write that does not fit evicts the
    least recently used contexts (``LruEviction``; never the one being saved, never a block).
    A JSON sidecar (``SIDECAR_NAME``) beside the segments describes each context and keeps the
    recency order for the next process (written by ``put_context_meta`` and a writer's
    ``close``; without it, contexts count as used in the order they were saved)."""

    def __init__(self, path: str | os.PathLike, budget_bytes: int, **options: Any) -> None:
        super().__init__(path, budget_bytes, **options)
        self._meta, self._recorded = self._read_sidecar()
        self._eviction = LruEviction(self, self._recorded)

    @property
    def evictions(self) -> int:
        """Saved contexts evicted to make room, since open."""
        return self._eviction.evictions

    def put_many(self, items: Sequence[tuple[StoreKey, bytes | memoryview]]) -> list[int]:
        """``DiskStore.put_many``, evicting saved contexts while the records do not fit."""
        return self._eviction.fit(lambda: DiskStore.put_many(self, items))

    def save_context(self, name: str, records: Sequence[bytes | memoryview]) -> int:
        """``DiskStore.save_context``, evicting other contexts while it does not fit; the context
        becomes the most recently used."""
        stored = self._eviction.fit(lambda: DiskStore.save_context(self, name, records), frozenset([name]))
        self._eviction.used(name)
        return stored

    def load_context(self, name: str, verify: bool = True,
                     then: Callable[[StoreKey, memoryview, str], Any] | None = None) -> list[Any]:
        """``DiskStore.load_context``; a writer marks the context the most recently used."""
        if not self.readonly and self.has_context(name):
            self._eviction.used(name)
        return super().load_context(name, verify, then)

    def context_meta(self, name: str) -> dict | None:
        return self._meta.get(name)

    def put_context_meta(self, name: str, meta: dict) -> None:
        self._meta[name] = meta
        self._write_sidecar()

    def close(self) -> None:
        """Record the recency order (writer, if it changed), then ``DiskStore.close``."""
        try:
            if not self.readonly and self._eviction.names() != self._recorded:
                self._write_sidecar()
        finally:
            super().close()

    def _write_sidecar(self) -> None:
        order = self._eviction.names()
        live = {k: v for k, v in self._meta.items() if self.has_context(k)}
        write_json_atomic(self.path / SIDECAR_NAME, {"format": "tiercache-contexts", "version": 2,
                                                     "contexts": live, "recency": order})
        self._recorded = order

    def _read_sidecar(self) -> tuple[dict[str, dict], list[str]]:
        """The descriptions and the recency order (least recently used first) the sidecar holds."""
        file = self.path / SIDECAR_NAME
        if not file.exists():
            return {}, []
        try:
            doc = json.loads(file.read_text(encoding="utf-8"))
            # "recency" is absent from sidecars written before eviction left the store.
            return {k: dict(v) for k, v in doc["contexts"].items()}, [str(n) for n in doc.get("recency", [])]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # Only descriptions are lost: the contexts themselves live in the store.
            print(f"tiercache: ignoring unreadable {file}: {exc!r}", file=sys.stderr)
            return {}, []
