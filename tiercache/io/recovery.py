"""Opening a disk store (``tiercache.io.store``): its index loaded from the manifest if that
checks out against the segment files, plus the batches committed after it; else rebuilt by
scanning every segment. Readers pick up later batches the same way (``Recovery.refresh``).

Where damage destroyed a batch's commit, the batch is judged from what surrounds it
(``Recovery._judge_doubtful``); a committed batch whose frames are unknowable makes the index
refuse every read it could have changed (``StoreIndex.unresolved``). Everything found is
reported: ``damage`` lists each damaged frame or region, ``recovery_note`` says why the index
was rebuilt or replayed.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from ..errors import CorruptBlockError, StoreError, StoreWarning
from .commits import TRAILER, parse_trailer
from .frames import FrameKind
from .index import StoreIndex
from .manifest import IndexEntry, Manifest, read_manifest
from .scan import Batch, SegmentScan
from .segments import Segment, segment_id, segment_name

#: Times a reader lists and opens the segments again when the writer's compaction removes one
#: under it, before it gives up.
_OPEN_TRIES = 20


class Vanished(Exception):
    """A segment file was removed (by the writer's compaction) while a reader opened it."""


class Recovery:
    """Fills ``index`` from its store directory and, for a reader, keeps it current.
    ``readonly``: a reader, which may race the writer's compaction. The caller holds the store's
    lock."""

    def __init__(self, index: StoreIndex, readonly: bool) -> None:
        self.path = index.path
        self.index = index
        self.readonly = readonly
        #: Why the index was rebuilt from the segments on open ("" if the manifest was current).
        self.recovery_note = ""
        #: Damaged frames and regions found (each naming its segment file and offset).
        self.damage: list[str] = []
        #: Batches at a segment's end whose commit was unreadable (not cut short): segment id ->
        #: ``SegmentScan.doubtful``; the batch numbers replayed since; the places judged already.
        self._doubtful: dict[int, tuple[int, str, bool]] = {}
        self._replayed: set[int] = set()
        self._judged: set[str] = set()

    def load(self) -> None:
        """Load the index: from the manifest if it checks out, plus the batches committed after
        it; else by scanning every segment. A reader whose segments the writer's compaction
        removes while it opens them starts again."""
        for attempt in range(_OPEN_TRIES):
            try:
                # A reader may race the writer's compaction: it trusts a manifest that disagrees
                # with the directory listing only once re-reading no longer helps.
                self._load_once(insist=not self.readonly or attempt >= _OPEN_TRIES // 2)
                return
            except Vanished:
                for seg in self.index.segments.values():
                    seg.retire()
                self.index.reset()
                self._doubtful, self._replayed, self._judged = {}, set(), set()
        raise StoreError(f"disk store {self.path}: segment files kept vanishing while opening it "
                         f"({_OPEN_TRIES} tries); is a writer compacting it continuously?")

    def refresh(self) -> None:
        """Reader: scan the batches committed since the last load or refresh, in every segment.
        ``Vanished`` if a segment was created and compacted away in between: the index must
        then be loaded afresh (its tombstones may be gone with it)."""
        index = self.index
        files = self.list_segments()
        top = max(files, default=0)
        if any(s not in files for s in range(index.next_segment, top + 1)):
            raise Vanished
        for seg_id in sorted(s for s in files if s >= index.next_segment):
            index.add_segment(self._open_segment(seg_id))
            index.next_segment = seg_id + 1
        for seg_id, seg in sorted(index.segments.items()):
            self._scan(seg, index.committed[seg_id])
        self._judge_doubtful(-1)
        for seg_id in [s for s in index.segments if s not in files and not index.live[s]]:
            index.segments[seg_id].retire()  # compacted away and nothing of it in use: let go
            index.forget_segment(seg_id)

    def note(self, text: str) -> None:
        """Add ``text`` to ``recovery_note``."""
        self.recovery_note = f"{self.recovery_note}; {text}" if self.recovery_note else text

    def list_segments(self) -> dict[int, Path]:
        try:
            return {segment_id(p): p for p in self.path.iterdir() if segment_id(p) is not None}
        except OSError as exc:
            raise StoreError(f"cannot list disk store directory {self.path}: {exc.strerror}") from exc

    def _open_segment(self, seg_id: int) -> Segment:
        try:
            return self.index.open_segment(seg_id)
        except FileNotFoundError:
            if self.readonly:
                raise Vanished from None
            path = self.path / segment_name(seg_id)
            raise StoreError(f"segment {path} vanished while the store was opening it") from None

    def _load_once(self, insist: bool) -> None:
        index = self.index
        got = read_manifest(self.path)
        files = self.list_segments()
        manifest, why, warn = got.manifest, got.problem, got.present
        if manifest is not None:
            why, warn = self._listing_problem(manifest, files)
            if why and not insist:
                raise Vanished
        for seg_id in sorted(files):
            index.add_segment(self._open_segment(seg_id))
        if manifest is not None and not why:
            why, warn = self._segments_problem(manifest), True
        if why and warn:
            warnings.warn(f"disk store {self.path}: ignoring its manifest ({why}); the index is rebuilt by "
                          "scanning the segments", StoreWarning, stacklevel=5)
        whole = manifest  # ignored or not, a whole manifest is the writer's word on what committed
        if why:
            manifest = Manifest()
        self.recovery_note = why
        index.seq = manifest.seq
        index.next_segment = max([manifest.next_segment] + [s + 1 for s in files])
        index.unresolved = list(whole.unresolved) if whole is not None else []
        for seg_id, (end, batch) in manifest.segments.items():
            index.committed[seg_id], index.last_batch[seg_id] = end, batch
        for key, entry in manifest.entries.items():
            index.apply_put(key, entry)
        for seg in list(index.segments.values()):
            start = index.committed[seg.id]
            if start > seg.size():
                self.note(f"{seg.path} is shorter ({seg.size()} bytes) than committed ({start}); "
                          "records past its end read as damaged")
                continue
            self._scan(seg, start)
            if start < index.committed[seg.id] and not self.recovery_note:
                self.recovery_note = f"replayed batches written after the manifest in {seg.path}"
        if whole is not None and why:
            self._check_claims(whole)
        self._judge_doubtful(manifest.seq)
        if self.damage:
            warnings.warn(f"disk store {self.path}: {len(self.damage)} damaged frames or regions found "
                          f"(first: {self.damage[0]}); see DiskStore.damage", StoreWarning, stacklevel=5)

    def _listing_problem(self, manifest: Manifest, files: dict[int, Path]) -> tuple[str, bool]:
        """Why the directory listing contradicts ``manifest`` ("" if it does not), and whether
        that means damage (to warn about) rather than a crash or a race with the writer."""
        for seg_id in sorted(manifest.segments):
            if seg_id not in files:  # for a reader, the writer may have compacted it since
                return f"segment {segment_name(seg_id)} it names is missing", not self.readonly
        for seg_id in sorted(files):
            if seg_id < manifest.next_segment and seg_id not in manifest.segments:
                # Compacted before the checkpoint and not removed yet (a crash, or a reader
                # racing the writer), or the manifest is wrong: only the segments can say.
                return f"it does not cover segment {files[seg_id].name}", False
        if self.readonly:
            top = max(files, default=0)
            missing = [s for s in range(manifest.next_segment, top + 1) if s not in files]
            if missing:  # created after the checkpoint this reader read, and compacted away since
                return f"segment {segment_name(missing[0])}, newer than the manifest, is missing", False
        return "", True

    def _segments_problem(self, manifest: Manifest) -> str:
        """Why the opened segments contradict ``manifest`` ("" if they do not)."""
        for seg_id, (end, batch) in manifest.segments.items():
            seg = self.index.segments[seg_id]
            if end < seg.data_start or seg.salt is None and end > seg.data_start:
                return f"{seg.path}: cannot check the committed end {end} it records"
            if end == seg.data_start or end > seg.size():  # a file cut short is reported on read
                continue
            try:
                t = parse_trailer(seg.read(end - TRAILER.size, TRAILER.size), end, seg.salt, str(seg.path))
            except (OSError, CorruptBlockError):
                t = None
            if t is None or t.batch != batch:
                return f"{seg.path} holds no commit of batch {batch} ending at offset {end}"
        for key, e in manifest.entries.items():
            end = manifest.segments.get(e.segment, (0, 0))[0]
            seg = self.index.segments.get(e.segment)
            if seg is None or e.offset < seg.data_start or e.offset + e.frame_len > end:
                return f"its entry of {key} lies outside the committed part of segment {e.segment}"
        return ""

    def _scan(self, seg: Segment, start: int) -> None:
        """Replay the committed batches of ``seg`` from ``start``."""
        scan = SegmentScan(seg, start)
        for batch in scan.batches():
            self._replay(seg.id, batch)
            self.index.committed[seg.id] = batch.end
            self.index.last_batch[seg.id] = batch.seq
        self.damage += scan.damage
        self.index.unresolved += scan.unresolved
        if scan.doubtful is not None and scan.doubtful[1] not in self._judged:
            self._doubtful[seg.id] = scan.doubtful
        if scan.tail and not self.readonly:  # a reader may simply be watching a batch being written
            self.note(scan.tail)

    def _check_claims(self, manifest: Manifest) -> None:
        """After a scan that ignored ``manifest`` (whole, but contradicting the segments): where
        it records more committed than the scan could read, damage destroyed committed batches
        whose frames are unknowable."""
        for seg_id, (end, batch) in manifest.segments.items():
            seg = self.index.segments.get(seg_id)
            if seg is not None and self.index.committed[seg_id] < end:
                where = f"segment {seg.path} offset {self.index.committed[seg_id]}"
                self.index.unresolved.append((where, batch))
                self.damage.append(f"{where}: unreadable, but the manifest records batches up to {batch} "
                                   f"committed up to offset {end}; their frames are unknowable")

    def _judge_doubtful(self, checkpoint_seq: int) -> None:
        """Settle the batches whose commit was unreadable (``SegmentScan.doubtful``). A writer
        retries a failed batch under the same number and numbers the next one only after a
        commit, so: if that number was used again (by a batch replayed, or one a checkpoint
        covers), the batch never committed; if higher numbers follow, it did, and damage
        destroyed its COMMIT frame. So it did too if non-zero bytes that are no frame lie where
        it ends: a killed writer leaves a batch cut short, a lost page reads as zeros, and a
        reader sees a file's bytes only once written (the size grows behind the copy). A
        committed batch whose frames are unknowable refuses every read it could have changed."""
        for seg_id, (seq, where, garbage) in list(self._doubtful.items()):
            if seq in self._replayed or seq <= checkpoint_seq:
                verdict = None
            elif max(self._replayed, default=0) > seq or garbage:
                verdict = (where, seq)
            else:
                continue  # zeros and nothing after: an unfinished write, as far as anyone can tell
            del self._doubtful[seg_id]
            self._judged.add(where)
            if verdict is not None:
                self.index.unresolved.append(verdict)
                self.damage.append(f"{where}: batch {seq} was committed (later batches or bytes follow) but "
                                   "damage destroyed its commit; its frames are unknowable")
        if not self._doubtful:
            self._replayed.clear()

    def _replay(self, seg_id: int, batch: Batch) -> None:
        index = self.index
        for f in batch.frames:
            if f.kind == FrameKind.RETIRE:
                index.retired.add(f.body_len)
            elif f.key is None:
                continue  # unknowable: the batch is unresolved
            elif f.kind == FrameKind.PUT:
                entry = IndexEntry(seg_id, f.offset, f.frame_len, f.key_len, f.body_len, f.body_crc, f.seq)
                current = index.entries.get(f.key)
                if current is None or entry.newer_than(current):
                    index.apply_put(f.key, entry)
            else:
                index.delete_older(f.key, f.seq)
        index.seq = max(index.seq, batch.seq)
        self._replayed.add(batch.seq)
