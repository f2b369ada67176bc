"""The disk store's manifest: a JSON checkpoint of its index, written atomically.

The segments are the source of truth; the manifest only saves scanning them. It records, as of
one moment, every live entry, how far each segment had been committed, the last sequence number
and the saved contexts' LRU order. On open the store loads it and scans each segment from the
recorded end to pick up later batches; with no (or an unreadable) manifest it scans everything.

Written as: temporary file, fsync, rename over ``manifest.json``, fsync of the directory, so a
crash leaves either the old or the new manifest, never a torn one. No pickle.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import StoreError
from .frames import HEADER_SIZE, StoreKey, key_from_json, key_to_json
from .segments import fsync_dir

MANIFEST_NAME = "manifest.json"
_FORMAT = "tiercache-disk-store"
_VERSION = 1


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """Where one record lives: segment id, frame offset and frame length (bytes), the frame's key
    length, the record's length and crc32, and the sequence number of the write that made it."""

    segment: int
    offset: int
    frame_len: int
    key_len: int
    record_len: int
    crc: int
    seq: int

    @property
    def span(self) -> int:
        """Bytes to read from ``offset`` to have the frame header, key and record."""
        return HEADER_SIZE + self.key_len + self.record_len

    def newer_than(self, other: "IndexEntry") -> bool:
        """True if this entry supersedes ``other`` for the same key. Compaction copies keep their
        sequence number, so equal numbers are broken by position: the copy is written later."""
        return (self.seq, self.segment, self.offset) > (other.seq, other.segment, other.offset)


@dataclass
class Manifest:
    seq: int = 0
    #: id the next new segment gets (ids are never reused).
    next_segment: int = 1
    #: segment id -> bytes committed in it (offset just past its last COMMIT frame) when written.
    segments: dict[int, int] = field(default_factory=dict)
    entries: dict[StoreKey, IndexEntry] = field(default_factory=dict)
    #: saved contexts, least recently used first.
    contexts_lru: list[str] = field(default_factory=list)


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Atomically replace ``directory/manifest.json`` with ``manifest``; ``StoreError`` (the old
    manifest intact) if it cannot be written."""
    doc = {
        "format": _FORMAT,
        "version": _VERSION,
        "seq": manifest.seq,
        "next_segment": manifest.next_segment,
        "segments": [[s, end] for s, end in sorted(manifest.segments.items())],
        "entries": [
            [key_to_json(k), e.segment, e.offset, e.frame_len, e.key_len, e.record_len, e.crc, e.seq]
            for k, e in manifest.entries.items()
        ],
        "contexts_lru": manifest.contexts_lru,
    }
    final = directory / MANIFEST_NAME
    tmp = directory / f"{MANIFEST_NAME}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(directory)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StoreError(
            f"writing manifest {final} failed ({exc.strerror}); the previous one stands"
        ) from exc


def read_manifest(directory: Path) -> tuple[Manifest | None, str]:
    """The manifest of ``directory``, or ``(None, why)`` if it is missing or unreadable (the store
    then rebuilds its index from the segments)."""
    path = directory / MANIFEST_NAME
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"{path} is missing"
    except (OSError, ValueError) as exc:
        return None, f"{path} is unreadable: {exc}"
    try:
        if doc["format"] != _FORMAT or doc["version"] != _VERSION:
            return None, (f"{path}: format {doc['format']!r} version {doc['version']}, "
                          f"expected {_FORMAT!r} {_VERSION}")
        entries = {key_from_json(row[0]): IndexEntry(*(int(x) for x in row[1:8])) for row in doc["entries"]}
        return Manifest(
            seq=int(doc["seq"]),
            next_segment=int(doc["next_segment"]),
            segments={int(s): int(end) for s, end in doc["segments"]},
            entries=entries,
            contexts_lru=[str(c) for c in doc["contexts_lru"]],
        ), ""
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        return None, f"{path} is malformed: {exc!r}"
