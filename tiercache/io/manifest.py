"""The disk store's manifest: a checksummed JSON checkpoint of its index, written atomically.

The segments are the source of truth; the manifest only saves scanning them. It records, as of
one moment, every live entry, how far each segment had been committed (and the number of its
last batch there), the last sequence number and the places where damage hid frames. On open
the store checks it against the segment files (every segment it names exists, every batch end
it records holds that batch's commit trailer, every entry lies inside its segment's committed
part) and scans each segment from the recorded end to pick up later batches. A manifest that is
missing, fails its checksum or disagrees with the segments is ignored, with a warning when it
was there, and the index is rebuilt by scanning.

File layout: one text line ``tiercache-disk-store <version> <crc32 hex> <body bytes>``, then
the JSON body. Written as: temporary file, fsync, rename over ``manifest.json``, fsync of the
directory, so a crash leaves either the old or the new manifest, never a torn one; a temporary
file a crash left behind is removed by the next writer. No pickle.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from ..errors import CorruptBlockError, StoreError
from .frames import FORMAT_VERSION, HEADER_SIZE, StoreKey, key_from_json, key_to_json
from .segments import fsync_dir

MANIFEST_NAME = "manifest.json"
_MAGIC = "tiercache-disk-store"
_TEMP_PREFIX = f"{MANIFEST_NAME}.tmp"


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
    #: segment id -> (bytes committed in it, the number of the batch that ends there; 0 if none).
    segments: dict[int, tuple[int, int]] = field(default_factory=dict)
    entries: dict[StoreKey, IndexEntry] = field(default_factory=dict)
    #: (place, highest sequence number) of frames that damage made unknowable.
    unresolved: list[tuple[str, int]] = field(default_factory=list)


class ManifestRead(NamedTuple):
    """What ``read_manifest`` found: the manifest, or None and why not (``present``: whether a
    manifest file was there at all)."""

    manifest: Manifest | None
    problem: str
    present: bool


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Atomically replace ``directory/manifest.json`` with ``manifest``; ``StoreError`` (the old
    manifest intact) if it cannot be written."""
    body = json.dumps({
        "seq": manifest.seq,
        "next_segment": manifest.next_segment,
        "segments": [[s, end, batch] for s, (end, batch) in sorted(manifest.segments.items())],
        "entries": [
            [key_to_json(k), e.segment, e.offset, e.frame_len, e.key_len, e.record_len, e.crc, e.seq]
            for k, e in manifest.entries.items()
        ],
        "unresolved": [[where, seq] for where, seq in manifest.unresolved],
    }, separators=(",", ":")).encode()
    head = f"{_MAGIC} {FORMAT_VERSION} {zlib.crc32(body):08x} {len(body)}\n".encode()
    final = directory / MANIFEST_NAME
    tmp = directory / f"{_TEMP_PREFIX}{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(head + body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(directory)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StoreError(
            f"writing manifest {final} failed ({exc.strerror}); the previous one stands"
        ) from exc


def read_manifest(directory: Path) -> ManifestRead:
    """The manifest of ``directory`` if it is there, whole and well-formed (the store then checks
    it against the segments); else why not."""
    path = directory / MANIFEST_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ManifestRead(None, f"{path} is missing", False)
    except OSError as exc:
        return ManifestRead(None, f"{path} is unreadable: {exc.strerror}", True)
    head, _, body = data.partition(b"\n")
    fields = head.decode("ascii", errors="replace").split(" ")
    if len(fields) != 4 or fields[0] != _MAGIC:
        return ManifestRead(None, f"{path} is unreadable: not a {_MAGIC} manifest", True)
    if fields[1] != str(FORMAT_VERSION):
        return ManifestRead(None, f"{path} is format {fields[1]!r}; this tiercache reads {FORMAT_VERSION}",
                            True)
    if fields[3] != str(len(body)) or fields[2] != f"{zlib.crc32(body):08x}":
        return ManifestRead(None, f"{path} fails its checksum (damaged or torn)", True)
    try:
        doc = json.loads(body)
        entries = {key_from_json(row[0]): IndexEntry(*(int(x) for x in row[1:8])) for row in doc["entries"]}
        manifest = Manifest(
            seq=int(doc["seq"]),
            next_segment=int(doc["next_segment"]),
            segments={int(s): (int(end), int(batch)) for s, end, batch in doc["segments"]},
            entries=entries,
            unresolved=[(str(where), int(seq)) for where, seq in doc["unresolved"]],
        )
    except (KeyError, TypeError, ValueError, IndexError, RecursionError, CorruptBlockError) as exc:
        return ManifestRead(None, f"{path} is malformed: {exc!r}", True)
    return ManifestRead(manifest, "", True)


def remove_stale_temporaries(directory: Path) -> int:
    """Remove temporary manifests that writers killed mid-checkpoint left; return how many.
    Only the writer (holding the store's lock) may call this: no one else writes them."""
    removed = 0
    for p in directory.glob(f"{_TEMP_PREFIX}*"):
        try:
            p.unlink()
            removed += 1
        except OSError:
            pass  # harmless: it is never read, and the next writer tries again
    return removed
