"""The disk store's in-memory state, shared by its recovery, reads and writes
(``tiercache.io.store``): where each record lives, the open segment files and how far each is
committed, and what damage left unknowable.

Every method assumes the caller holds the store's lock.
"""

from __future__ import annotations

from pathlib import Path

from ..blocks import BlockKey
from ..errors import BlockNotFoundError, CorruptBlockError
from .frames import ContextPart, StoreKey
from .manifest import IndexEntry, Manifest
from .segments import Segment, segment_name


class StoreIndex:
    """Key -> ``IndexEntry`` for blocks and the parts of saved contexts, and per segment file:
    bytes committed (``committed``), the number of its last committed batch (``last_batch``) and
    bytes of live PUT frames (``live``). Sizes in bytes. ``path``: the store's directory;
    ``align`` and ``direct``: how its segment files are opened (see ``Segment``)."""

    def __init__(self, path: Path, align: int, direct: bool) -> None:
        self.path = path
        self.align = align
        self.direct = direct
        self.reset()

    def reset(self) -> None:
        """Forget everything (before loading again)."""
        self.entries: dict[StoreKey, IndexEntry] = {}
        self.by_seq: dict[int, set[BlockKey]] = {}
        self.contexts: dict[str, int] = {}  # name -> number of parts
        self.segments: dict[int, Segment] = {}
        self.committed: dict[int, int] = {}
        self.last_batch: dict[int, int] = {}
        self.live: dict[int, int] = {}
        self.seq = 0
        self.next_segment = 1  # segment ids are never reused: readers may hold removed ones open
        #: Segments that RETIRE frames declare dead (their live records were copied forward).
        self.retired: set[int] = set()
        #: Retired segments whose file could not be removed: their tombstones still matter.
        self.zombies: set[int] = set()
        #: Segments compaction must leave alone (they hold damage it cannot copy), and why.
        self.pinned: dict[int, str] = {}
        #: (place, highest seq) of frames damage made unknowable (see ``check_unresolved``).
        self.unresolved: list[tuple[str, int]] = []

    def open_segment(self, seg_id: int, create_salt: int | None = None) -> Segment:
        """Open segment ``seg_id`` (or create it, with ``create_salt``); not tracked yet."""
        return Segment(self.path / segment_name(seg_id), seg_id, self.align, self.direct, create_salt)

    def add_segment(self, seg: Segment) -> None:
        """Track ``seg``, nothing committed in it yet."""
        self.segments[seg.id] = seg
        self.committed[seg.id] = seg.data_start
        self.last_batch[seg.id] = 0
        self.live.setdefault(seg.id, 0)

    def forget_segment(self, seg_id: int) -> None:
        del self.segments[seg_id]
        del self.committed[seg_id]
        del self.last_batch[seg_id]
        del self.live[seg_id]

    def entry(self, key: StoreKey) -> IndexEntry:
        """Where ``key``'s record lives; ``BlockNotFoundError`` if absent."""
        try:
            return self.entries[key]
        except KeyError:
            raise BlockNotFoundError(f"disk store {self.path} does not hold {key}") from None

    def used_bytes(self) -> int:
        """Bytes of live frames (records plus frame headers and alignment padding)."""
        return sum(self.live.values())

    def disk_bytes(self) -> int:
        """Bytes of all segment files, dead frames awaiting compaction included."""
        return sum(seg.size() for seg in self.segments.values())

    def manifest(self) -> Manifest:
        """A checkpoint of this state."""
        segments = {s: (end, self.last_batch[s]) for s, end in self.committed.items()}
        return Manifest(self.seq, self.next_segment, segments, dict(self.entries), list(self.unresolved))

    def saved_seq(self, name: str) -> int:
        """Sequence number of the save of context ``name`` (-1 if its first part is lost)."""
        entry = self.entries.get(ContextPart(name, 0))
        return entry.seq if entry is not None else -1

    def apply_put(self, key: StoreKey, entry: IndexEntry) -> None:
        old = self.entries.get(key)
        if old is not None:
            self.live[old.segment] = self.live.get(old.segment, 0) - old.frame_len
        elif isinstance(key, BlockKey):
            self.by_seq.setdefault(key.seq, set()).add(key)
        else:
            self.contexts[key.context] = self.contexts.get(key.context, 0) + 1
        self.entries[key] = entry
        self.live[entry.segment] = self.live.get(entry.segment, 0) + entry.frame_len

    def delete_older(self, key: StoreKey, seq: int) -> None:
        """Apply a DELETE of sequence number ``seq``: it removes only an older record (compaction
        carries old DELETE frames forward, behind newer records of the same key)."""
        current = self.entries.get(key)
        if current is not None and current.seq < seq:
            self._apply_delete(key)

    def _apply_delete(self, key: StoreKey) -> None:
        entry = self.entries.pop(key)
        self.live[entry.segment] -= entry.frame_len
        if isinstance(key, BlockKey):
            keys = self.by_seq[key.seq]
            keys.discard(key)
            if not keys:
                del self.by_seq[key.seq]
        else:
            self.contexts[key.context] -= 1
            if not self.contexts[key.context]:
                del self.contexts[key.context]

    def check_unresolved(self, key: StoreKey) -> None:
        """``CorruptBlockError`` if frames that damage made unknowable may hold a newer version of
        ``key`` than the index has (or hold ``key`` at all, if the index has none): every lost
        frame was written at or before its batch's sequence number."""
        entry = self.entries.get(key)
        seq = entry.seq if entry is not None else -1
        for where, highest in self.unresolved:
            if seq <= highest:
                raise CorruptBlockError(
                    f"{where}: damaged frames of unknown keys (batch {highest} or older) may hold a newer "
                    f"version of {key} than the one indexed; it is not served"
                )
