"""Writing a disk store (``tiercache.io.store``): batches appended to the active segment,
compaction and checkpoints. Only the writer (the process holding the store's lock file) writes.

- **Batches.** A write is a batch of frames closed by a COMMIT frame (``tiercache.io.commits``)
  and, with ``sync``, one ``fdatasync``; only then is it applied to the index. A batch never
  spans segments: a new segment file is started when the active one would outgrow
  ``segment_bytes``. On a write error nothing is applied, the partial batch is cut off and later
  batches go to a fresh segment.
- **Compaction.** Copies a segment's live records (and the tombstones older segments still
  need) to the active segment, records its retirement in the log (a RETIRE frame), checkpoints,
  then removes the file; emptiest segments first, only segments at least ``_COMPACT_MIN_DEAD``
  dead. A segment holding damage it cannot copy is left as it is (pinned).
- **Checkpoints.** The index goes to the manifest (``tiercache.io.manifest``) every
  ``checkpoint_every`` batches, after compaction and at close.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from ..errors import CapacityError, CorruptBlockError, StoreError, TiercacheError
from .commits import DirEntry, commit_length, directory_length, pack_commit
from .frames import FrameKind, StoreKey, frame_length, key_to_bytes, pack_frame, record_crc
from .index import StoreIndex
from .manifest import IndexEntry, remove_stale_temporaries, write_manifest
from .reads import read_record
from .record import prefix_size, record_length
from .scan import SegmentScan
from .segments import Segment, fsync_dir

#: Bytes of records copied per compaction batch.
_COMPACT_BATCH = 64 << 20
#: Compaction only rewrites segments at least this dead, so a store kept full of live records
#: does not copy the same records over and over.
_COMPACT_MIN_DEAD = 0.25


@dataclass(frozen=True, slots=True)
class WriteFrame:
    """A frame to write: PUT (with its record), DELETE, or RETIRE of segment ``segment``;
    ``seq`` None means the batch's own."""

    kind: FrameKind
    key: StoreKey | None
    record: bytes | memoryview = b""
    seq: int | None = None
    segment: int = 0


def checked_record(key: object, record: bytes | memoryview) -> bytes | memoryview:
    """``record`` if its prefix says it is exactly ``len(record)`` bytes long; else ``StoreError``."""
    if len(record) < prefix_size() + 4:
        raise StoreError(f"{key}: {len(record)} bytes is not a record")
    try:
        length = record_length(bytes(record[: prefix_size()]), str(key))
    except CorruptBlockError as exc:
        raise StoreError(f"{key}: not a record: {exc}") from exc
    if length != len(record):
        raise StoreError(f"{key}: record of {len(record)} bytes says it is {length} bytes long")
    return record


class StoreWriter:
    """Appends batches to the segments ``index`` tracks (see the module docstring for the
    settings, all as ``DiskStore`` takes them). The caller holds the store's lock and has
    checked that the store is open for writing."""

    def __init__(self, index: StoreIndex, *, budget_bytes: int, segment_bytes: int, sync: bool,
                 checkpoint_every: int) -> None:
        self.index = index
        self.budget_bytes = budget_bytes
        self.segment_bytes = segment_bytes
        self.sync = sync
        self.checkpoint_every = checkpoint_every
        #: Why the last periodic checkpoint, or automatic compaction, failed ("" if it did not).
        self.checkpoint_error = ""
        self.compaction_error = ""
        self._active: Segment | None = None
        self._batches_since_checkpoint = 0

    def frame_bytes(self, key: StoreKey, record_len: int) -> int:
        """Bytes a record of ``record_len`` bytes under ``key`` takes in the store."""
        return frame_length(FrameKind.PUT, len(key_to_bytes(key)), record_len, self.index.align)

    def check_room(self, frames: list[WriteFrame]) -> None:
        """``CapacityError`` unless the PUT ``frames`` fit in the budget (beside the live frames
        they do not replace)."""
        need = 0
        for f in frames:
            if f.kind != FrameKind.PUT:
                continue
            need += self.frame_bytes(f.key, len(f.record))
            old = self.index.entries.get(f.key)
            need -= old.frame_len if old is not None else 0
        used = self.index.used_bytes()
        if used + need > self.budget_bytes:
            raise CapacityError(
                f"disk store {self.index.path}: {need} more bytes do not fit; {used} of budget_bytes="
                f"{self.budget_bytes} hold live records: delete some, or open the store with a larger budget"
            )

    def commit(self, frames: list[WriteFrame], sync: bool = True) -> list[IndexEntry]:
        """Append ``frames`` and a COMMIT frame as one batch, make it durable, then apply it to the
        index. Returns the PUT frames' entries. On a write error nothing is applied, the partial
        batch is cut off and later batches go to a fresh segment."""
        if not frames:
            return []
        index = self.index
        seq = index.seq + 1
        frames = sorted(frames, key=lambda f: f.kind)  # PUTs first, so every PUT starts aligned
        encoded = [(f, key_to_bytes(f.key) if f.key is not None else b"") for f in frames]
        lengths = [frame_length(f.kind, len(k), len(f.record), self.index.align) for f, k in encoded]
        # The COMMIT frame's exact length depends on where it starts; this bounds it.
        dir_len = directory_length(len(encoded), sum(len(k) for _, k in encoded))
        align = self.index.align
        seg = self._active_segment(sum(lengths) + commit_length(0, dir_len, align) + align)
        start = pos = index.committed[seg.id]
        parts: list[bytes | memoryview] = []
        entries: list[DirEntry] = []
        applied: list[tuple[WriteFrame, IndexEntry | None]] = []
        for (f, key_bytes), length in zip(encoded, lengths):
            fseq = f.seq if f.seq is not None else seq
            crc = record_crc(f.record) if f.kind == FrameKind.PUT else 0
            body_len = len(f.record) if f.kind != FrameKind.RETIRE else f.segment
            parts += pack_frame(f.kind, fseq, seq, seg.salt, key_bytes, f.record, body_len, crc, length)
            entries.append(DirEntry(f.kind, key_bytes, pos, length, fseq, body_len, crc))
            applied.append((f, IndexEntry(seg.id, pos, length, len(key_bytes), len(f.record), crc, fseq)
                            if f.kind == FrameKind.PUT else None))
            pos += length
        commit = pack_commit(pos, seq, seg.salt, entries, self.index.align)
        parts += commit
        pos += sum(map(len, commit))
        if start == seg.data_start:  # the segment's first batch: its header goes first
            parts.insert(0, seg.header())
        try:
            seg.append(parts, 0 if start == seg.data_start else start)
            if self.sync and sync:
                seg.sync()
        except OSError as exc:
            self._abandon_active(seg, start)
            what = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror
            raise StoreError(
                f"writing {len(frames)} entries to segment {seg.path} at offset {start} failed ({what}); "
                "nothing of this batch was stored, everything committed before is intact"
            ) from exc
        index.committed[seg.id] = pos
        index.last_batch[seg.id] = seq
        index.seq = seq
        for f, entry in applied:
            if entry is not None:
                index.apply_put(f.key, entry)
            elif f.kind == FrameKind.DELETE:
                index.delete_older(f.key, f.seq if f.seq is not None else seq)
        self._batches_since_checkpoint += 1
        if self._batches_since_checkpoint >= self.checkpoint_every:
            try:
                self.checkpoint()
            except StoreError as exc:
                # The batch is committed all the same (the segments are the truth); the
                # checkpoint is retried after the next batches.
                self.checkpoint_error = str(exc)
        return [e for _, e in applied if e is not None]

    def checkpoint(self) -> None:
        """Write the manifest now (atomically)."""
        write_manifest(self.index.path, self.index.manifest())
        self._batches_since_checkpoint = 0
        self.checkpoint_error = ""

    def _active_segment(self, batch_bytes: int) -> Segment:
        """The segment to append a batch of at most ``batch_bytes`` to, starting a new one when
        the active one would outgrow ``segment_bytes`` (a batch never spans segments)."""
        seg = self._active
        committed = self.index.committed
        if seg is not None and (committed[seg.id] == seg.data_start
                                or committed[seg.id] + batch_bytes <= self.segment_bytes):
            return seg
        seg_id = self.index.next_segment
        self.index.next_segment += 1
        salt = int.from_bytes(os.urandom(4), "little")
        seg = self.index.open_segment(seg_id, create_salt=salt)
        self.index.add_segment(seg)
        try:
            fsync_dir(self.index.path)  # the new file's directory entry must survive a crash too
        except OSError as exc:
            self._abandon_active(seg, seg.data_start)
            raise StoreError(f"cannot make segment {seg.path} durable: {exc.strerror}") from exc
        self._active = seg
        return seg

    def _abandon_active(self, seg: Segment, committed: int) -> None:
        # Cut the torn batch off so no scan can ever mistake it for data, and never append to a
        # file that failed a write or a sync again (after a failed fsync the kernel may have
        # dropped dirty pages). A segment left without any batch goes altogether.
        self._active = None
        try:
            seg.truncate(committed if committed > seg.data_start else 0)
        except OSError:
            return
        if committed == seg.data_start:  # nothing committed, not even the segment header
            try:
                self.remove_segment(seg)
            except StoreError:
                pass  # an empty segment: the next writer removes it

    def clean_up(self) -> list[str]:
        """After loading: remove what failures left behind. Temporary manifests; empty segments
        (a write failed before anything was committed); segments RETIRE frames declare dead,
        once this index confirms nothing live is left in them. Returns what could not be."""
        remove_stale_temporaries(self.index.path)
        problems = []
        for seg in list(self.index.segments.values()):
            live = self.index.live[seg.id]
            if (seg.size() <= seg.data_start or seg.id in self.index.retired) and live == 0:
                try:
                    self.remove_segment(seg)
                except StoreError as exc:
                    problems.append(str(exc))
        return problems

    def remove_segment(self, seg: Segment) -> None:
        """Forget ``seg`` and remove its file (the caller has proven it holds nothing live)."""
        self._forget_segment(seg.id)
        seg.retire()
        try:
            os.unlink(seg.path)
            fsync_dir(self.index.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            self.index.zombies.add(seg.id)  # its tombstones still hide older records in older segments
            raise StoreError(f"could not remove dead segment {seg.path}: {exc.strerror}") from exc
        self.index.zombies.discard(seg.id)

    def _forget_segment(self, seg_id: int) -> None:
        self.index.forget_segment(seg_id)
        if self._active is not None and self._active.id == seg_id:
            self._active = None

    def maybe_compact(self) -> None:
        """Compact if the files exceed the budget. Called after each write batch, never from
        inside one (compaction itself commits)."""
        if self.index.disk_bytes() > self.budget_bytes:
            try:
                self.compact()
            except TiercacheError as exc:
                # The write succeeded; a segment that cannot be compacted (damaged, or the disk
                # is full) keeps its space until an explicit compact() reports why.
                self.compaction_error = str(exc)

    def compact(self, target_bytes: int | None = None) -> int:
        """Reclaim dead space until the segment files take at most ``target_bytes`` (default: the
        budget), emptiest segments first; return the bytes reclaimed."""
        index = self.index
        target = self.budget_bytes if target_bytes is None else target_bytes
        before = index.disk_bytes()
        candidates = sorted(
            (s for s in index.segments.values()
             if s is not self._active and s.id not in index.pinned
             and s.size() - index.live[s.id] >= _COMPACT_MIN_DEAD * s.size()),
            key=lambda s: index.live[s.id] / max(1, s.size()),
        )
        for seg in candidates:
            if index.disk_bytes() <= target:
                break
            self._compact_segment(seg)
        return before - index.disk_bytes()

    def _compact_segment(self, seg: Segment) -> None:
        """Copy the live records of ``seg`` (and the tombstones older segments still need) to the
        active segment, record its retirement, then remove it."""
        index = self.index
        older_exists = any(s < seg.id for s in [*index.segments, *index.zombies])
        live = index.live[seg.id]
        copied = 0
        batch: list[WriteFrame] = []
        batch_bytes = 0
        scan = SegmentScan(seg, seg.data_start, limit=index.committed[seg.id])
        for found in scan.batches():
            for f in found.frames:
                entry = index.entries.get(f.key) if f.key is not None else None
                here = entry is not None and (entry.segment, entry.offset) == (seg.id, f.offset)
                if f.kind == FrameKind.PUT and here:
                    try:
                        if f.damage:
                            raise CorruptBlockError(f.damage)
                        record = read_record(seg, f.offset, f.key_len, f.body_len, f.body_crc)
                    except CorruptBlockError as exc:
                        return self._pin(seg, f"it holds a damaged live record ({exc})")
                    batch.append(WriteFrame(FrameKind.PUT, f.key, bytes(record), f.seq))
                    batch_bytes += f.frame_len
                    copied += f.frame_len
                elif f.kind == FrameKind.DELETE and older_exists:
                    # It may still hide an older record of its key in an older segment.
                    batch.append(WriteFrame(FrameKind.DELETE, f.key, seq=f.seq))
                elif f.kind == FrameKind.RETIRE and f.body_len in index.zombies:
                    batch.append(WriteFrame(FrameKind.RETIRE, None, segment=f.body_len))
            if batch_bytes >= _COMPACT_BATCH:
                self.commit(batch)
                batch, batch_bytes = [], 0
        if scan.unresolved or scan.committed != index.committed[seg.id] or copied != live:
            self.commit(batch)
            return self._pin(seg, "damage hides some of its frames; its live records could not all be found")
        # Proven dead by this index: nothing live is left in it. The log says so before the
        # manifest stops naming it and before the file goes.
        self.commit(batch + [WriteFrame(FrameKind.RETIRE, None, segment=seg.id)])
        index.retired.add(seg.id)
        self._forget_segment(seg.id)
        self.checkpoint()
        seg.retire()
        try:
            os.unlink(seg.path)
            fsync_dir(index.path)
        except OSError as exc:
            index.zombies.add(seg.id)
            raise StoreError(f"compaction could not remove {seg.path}: {exc.strerror}") from exc

    def _pin(self, seg: Segment, why: str) -> None:
        self.index.pinned[seg.id] = why
        self.compaction_error = f"compaction leaves {seg.path} as it is: {why}"
