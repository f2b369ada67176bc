"""Scanning a segment file: its committed batches, found again after damaged bytes.

A scan walks the frames of a segment from a committed offset. Where a frame header fails its
checks (bad magic, salt, lengths or checksum), it does not stop, as SQLite's WAL and RocksDB's
log readers do at the first bad record (dropping every committed record after it): it searches
on (every 8-byte boundary, where frames start) for the next header that carries the segment's
salt and passes its checksum, and carries on. Each batch is then settled by its COMMIT frame:

- Its directory (``tiercache.io.commits``) names every frame of the batch, so a frame whose own
  header is damaged is still known: a DELETE is applied, a PUT still shadows older versions of
  its key and reads of it raise ``CorruptBlockError``. A newer version is never shadowed by an
  older one because a frame in between was damaged.
- The batch counts as committed when its trailer (the last bytes written) is valid; or when a
  later batch follows in the same file (a writer only appends after a batch succeeded); or when
  its trailer alone is damaged but the COMMIT header, the directory's frame count and every frame
  check out. A batch cut short at the end of the file is an unfinished write, never data.
- When damage hides frames that neither their headers nor the directory name (two damaged
  places in one batch), the batch is *unresolved*: the store then refuses reads that the lost
  frames could have changed instead of serving a possibly stale version.

Every damaged frame or region found is listed in ``SegmentScan.damage`` with its file and offset.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import CorruptBlockError
from .commits import ENTRY, TRAILER, TRAILER_MAGIC, DirEntry, Trailer, parse_directory, parse_trailer
from .frames import (
    FRAME_MAGIC,
    HEADER_SIZE,
    SMALL_ALIGN,
    FrameHeader,
    FrameKind,
    StoreKey,
    check_record,
    key_from_bytes,
    parse_header,
)
from .segments import Segment

#: Bytes read to parse a frame header and its key (keys are at most ~6 KiB).
_HEADER_READ = 8192
#: Bytes of a segment read at once while scanning or searching.
_WINDOW = 4 << 20


@dataclass(slots=True)
class Frame:
    """A frame of a committed batch. ``key`` is None for RETIRE (whose ``body_len`` is the retired
    segment's id); ``damage`` says why its bytes cannot be trusted ("" if intact)."""

    kind: FrameKind
    key: StoreKey | None
    offset: int
    frame_len: int
    key_len: int
    seq: int
    body_len: int
    body_crc: int
    damage: str = ""


@dataclass(slots=True)
class Batch:
    """A committed batch: its sequence number, the offset just past it, and its frames."""

    seq: int
    end: int
    frames: list[Frame]


class _Window:
    """Positioned reads of one segment through a reusable window (scans read small headers)."""

    def __init__(self, seg: Segment, size: int) -> None:
        self.seg = seg
        self.size = size
        self.base = 0
        self.buf = memoryview(b"")

    def get(self, pos: int, n: int, fresh: bool = False) -> memoryview:
        """The bytes at ``[pos, pos + n)``, fewer where the file ends (none on a read error)."""
        end = min(pos + n, self.size)
        if pos >= end:
            return memoryview(b"")
        if not fresh and self.base <= pos and end <= self.base + len(self.buf):
            return self.buf[pos - self.base : end - self.base]
        try:
            if fresh or end - pos > _WINDOW // 2:
                return self.seg.read(pos, end - pos)
            base = pos - pos % self.seg.align
            self.buf = self.seg.read(base, min(_WINDOW, self.size - base))
            self.base = base
        except (OSError, CorruptBlockError):  # unreadable or shrunk: the caller sees no frame there
            self.buf = memoryview(b"")
            return self.buf
        return self.buf[pos - base : end - base]


class SegmentScan:
    """The committed batches of ``seg`` from offset ``start`` (a batch boundary) up to ``limit``
    (default: the file's current size), each found by ``batches()``.

    Afterwards ``committed`` is the end of the last committed batch, ``tail`` says why bytes
    after it were not taken ("" if none were left), ``damage`` lists damaged frames and regions
    and ``unresolved`` the (place, highest sequence number) of frames damage made unknowable.
    """

    def __init__(self, seg: Segment, start: int, limit: int | None = None) -> None:
        self.seg = seg
        self.size = seg.size() if limit is None else limit
        self.committed = start
        self.tail = ""
        self.damage: list[str] = []
        self.unresolved: list[tuple[str, int]] = []
        #: (batch number, place, whether non-zero bytes are among the unreadable ones) of a batch
        #: at the end whose commit was unreadable but not cut short.
        self.doubtful: tuple[int, str, bool] | None = None
        self._cut = False  # the batch being read ends where the file does: an unfinished write
        self._last_batch = -1
        self._io = _Window(seg, self.size)

    def where(self, pos: int) -> str:
        return f"segment {self.seg.path} offset {pos}"

    def batches(self) -> Iterator[Batch]:
        if self.seg.salt is None:
            self.seg.read_header()  # a reader may have opened it before its first batch was written
        if self.seg.salt is None and (self.size <= self.seg.data_start or not self._find_salt()):
            return
        while self.committed < self.size:
            batch = self._batch(self.committed)
            if batch is None or batch.end <= self.committed:
                return
            self.committed = batch.end
            yield batch

    # ------------------------------------------------------------------ one batch

    def _batch(self, start: int) -> Batch | None:
        walked: dict[int, Frame] = {}  # frames whose own headers are intact, by offset
        gaps: list[tuple[int, int]] = []  # damaged regions inside the batch
        seq: int | None = None
        pos = start
        mark = len(self.damage)
        while True:
            found = self._header(pos)
            nxt: tuple[int, FrameHeader] | None
            if found is not None and (found[0].batch == seq if seq is not None
                                      else found[0].batch > self._last_batch):
                header, key_bytes = found
                if header.kind == FrameKind.COMMIT:
                    batch = self._settle(start, header.batch, walked, gaps, (pos, header), None)
                elif pos + header.frame_len > self.size:  # cut short: the end of an unfinished write
                    batch, self._cut = None, True
                else:
                    seq = header.batch
                    walked[pos] = self._frame(pos, header, key_bytes)
                    pos += header.frame_len
                    continue
                return batch if batch is not None else self._stop(start, pos, mark, seq)
            if found is not None and seq is not None and found[0].batch > seq:
                nxt = (pos, found[0])  # a later batch begins where this one's COMMIT should be
            else:
                nxt = self._resync(pos, seq)
            q, qh = nxt if nxt is not None else (self.size, None)
            # The damage may hide this batch's COMMIT header (or, at the batch's start, all of a
            # small batch but its directory and trailer): its trailer then still stands.
            trailer = self._find_trailer(pos, q, seq) if qh is None or qh.batch != seq else None
            if trailer is not None:
                batch = self._settle(start, trailer.batch, walked, gaps + [(pos, trailer.end)], None, trailer)
            elif qh is None:  # nothing valid further on but, perhaps, a later batch's trailer
                later = self._later(pos, seq) if seq is not None else None
                batch = (self._settle(start, seq, walked, gaps + [(pos, q)], None, None, later=later)
                         if later is not None else None)
            elif seq is not None and qh.batch != seq:  # the batch ended in [pos, q), no trailer left
                batch = self._settle(start, seq, walked, gaps + [(pos, q)], None, None, later=qh.batch)
            else:
                gaps.append((pos, q))
                pos = q
                continue
            return batch if batch is not None else self._stop(start, pos, mark, seq)

    def _settle(self, start: int, seq: int, walked: dict[int, Frame], gaps: list[tuple[int, int]],
                commit: tuple[int, FrameHeader] | None, trailer: Trailer | None,
                later: int | None = None) -> Batch | None:
        """The batch from ``start`` if it is committed, else None. ``commit``: its COMMIT frame's
        offset and header, if intact; ``trailer``: its trailer, if found without that header;
        ``later``: the number of a batch found after it in this file, if any."""
        commit_pos = count = dir_len = end = None
        if commit is not None:
            commit_pos, header = commit
            end = commit_pos + header.frame_len
            if end > self.size:  # the COMMIT frame is cut short: an unfinished write
                self._cut = True
                return None
            count, dir_len = header.body_len, header.body_crc
            try:
                trailer = parse_trailer(self._io.get(end - TRAILER.size, TRAILER.size), end, self.seg.salt,
                                        self.where(end - TRAILER.size))
                if (trailer.batch, trailer.count, trailer.dir_len) != (seq, count, dir_len):
                    trailer = None
            except CorruptBlockError:
                trailer = None
            if trailer is None:
                self.damage.append(f"{self.where(end - TRAILER.size)}: commit trailer of batch {seq} damaged")
                later = self._later(end, seq)
        elif trailer is not None:
            count, dir_len, end = trailer.count, trailer.dir_len, trailer.end
            self.damage.append(f"{self.where(gaps[-1][0])}: COMMIT frame header of batch {seq} damaged; "
                               "its trailer stands")
        frames, complete = self._frames(start, walked, gaps, count, dir_len, end, commit_pos)
        intact = complete and not any(f.damage for f in frames)
        if trailer is None and later is None and not (commit is not None and intact):
            return None
        self.damage += [f.damage for f in frames if f.damage]
        if not complete:
            self.unresolved.append((self.where(start), max(seq, later or 0)))
            self.damage.append(f"{self.where(start)}: batch {seq} holds frames that damage made unknowable")
        self._last_batch = seq
        # Where the batch ends is unknown when damage took its COMMIT frame: the next one is
        # sought from where the damage starts.
        return Batch(seq, end if end is not None else gaps[-1][0], frames)

    def _frames(self, start: int, walked: dict[int, Frame], gaps: list[tuple[int, int]], count: int | None,
                dir_len: int | None, end: int | None, commit_pos: int | None) -> tuple[list[Frame], bool]:
        """The batch's frames and whether they are all known: from the frames' own headers when
        the walk met no damage, else merged with the COMMIT frame's directory."""
        frames = sorted(walked.values(), key=lambda f: f.offset)
        if not gaps and count == len(frames) and _tiles(frames, start, commit_pos):
            return [self._recheck(f) if f.damage else f for f in frames], True
        entries: list[DirEntry | None] = []
        if (count is not None and dir_len is not None and end is not None
                and count * ENTRY.size <= dir_len <= end - TRAILER.size - start):
            entries = parse_directory(self._io.get(end - TRAILER.size - dir_len, dir_len), count)
        known: dict[int, Frame] = {}
        for e in entries:
            if e is not None:
                f = _entry_frame(e)
                w = walked.get(e.offset)
                known[e.offset] = w if w is not None and _same(w, f) else self._lost_header(f)
        if len(entries) != count or None in entries:  # a damaged directory: add what the walk found
            for offset, w in walked.items():
                known.setdefault(offset, w)
        frames = sorted(known.values(), key=lambda f: f.offset)
        frames = [self._recheck(f) if f.damage else f for f in frames]
        complete = (count == len(frames) and _tiles(frames, start, commit_pos)
                    and all(f.key is not None for f in frames if f.kind != FrameKind.RETIRE))
        return frames, complete

    # ------------------------------------------------------------------ frames

    def _header(self, pos: int) -> tuple[FrameHeader, bytes] | None:
        """The valid frame header at ``pos`` (this segment's salt), or None."""
        try:
            return parse_header(self._io.get(pos, _HEADER_READ), self.where(pos), self.seg.salt)
        except CorruptBlockError:
            return None

    def _frame(self, pos: int, header: FrameHeader, key_bytes: bytes, fresh: bool = False) -> Frame:
        """The frame whose intact header is at ``pos``; its record, if any, checked."""
        key, damage = None, ""
        if header.kind in (FrameKind.PUT, FrameKind.DELETE):
            try:
                key = key_from_bytes(key_bytes)
            except CorruptBlockError as exc:
                damage = f"{self.where(pos)}: unreadable key: {exc}"
        if header.kind == FrameKind.PUT and not damage:
            record = self._io.get(pos + header.body_offset, header.body_len, fresh)
            try:
                if len(record) != header.body_len:
                    raise CorruptBlockError(f"{self.where(pos)}: truncated record")
                check_record(record, header.body_crc, self.where(pos))
            except CorruptBlockError as exc:
                damage = str(exc)
        return Frame(header.kind, key, pos, header.frame_len, header.key_len, header.seq, header.body_len,
                     header.body_crc, damage)

    def _recheck(self, f: Frame) -> Frame:
        """Read a damaged frame once more: a reader may have read it while the writer was still
        writing it (its batch's COMMIT frame, read later, was complete)."""
        try:
            header, key_bytes = parse_header(self._io.get(f.offset, _HEADER_READ, fresh=True),
                                             self.where(f.offset), self.seg.salt)
        except CorruptBlockError:
            return f
        again = self._frame(f.offset, header, key_bytes, fresh=True)
        return again if not again.damage and _same(again, f) else f

    def _lost_header(self, f: Frame) -> Frame:
        """``f`` (from the directory) whose own header is damaged or disagrees with it."""
        f.damage = (f"{self.where(f.offset)}: frame header damaged; the batch's directory names it "
                    f"{f.kind.name} {f.key}")
        if f.kind == FrameKind.PUT:
            return f
        # A DELETE or RETIRE is whole in its directory entry: it is applied; the damage reported.
        self.damage.append(f.damage + ", applied from the directory")
        f.damage = ""
        return f

    # ------------------------------------------------------------------ searching

    def _search(self, magic: bytes, lo: int, hi: int, phase: int, step: int) -> Iterator[int]:
        """Offsets ``p`` in ``[lo, hi)`` with ``p % step == phase`` where ``magic`` starts."""
        pos = lo
        while pos < hi:
            window = bytes(self._io.get(pos, min(_WINDOW // 2, hi - pos) + len(magic) - 1))
            if len(window) < len(magic):
                return
            i = window.find(magic)
            while i >= 0 and pos + i < hi:
                if (pos + i) % step == phase:
                    yield pos + i
                i = window.find(magic, i + 1)
            pos += len(window) - len(magic) + 1

    def _resync(self, pos: int, seq: int | None) -> tuple[int, FrameHeader] | None:
        """The next valid frame header after the damaged one at ``pos``: of this batch (``seq``)
        or a later one."""
        least = seq if seq is not None else self._last_batch + 1
        for q in self._search(FRAME_MAGIC, pos + 1, self.size, 0, SMALL_ALIGN):
            found = self._header(q)
            if found is not None and found[0].batch >= least and q + found[0].frame_len <= self.size:
                return q, found[0]
        return None

    def _later(self, pos: int, seq: int) -> int | None:
        """The number of a batch after batch ``seq`` that a valid frame header or commit trailer
        from ``pos`` on belongs to, if any: proof that the writer appended after batch ``seq``
        in this file, which it does only once a batch is committed."""
        nxt = self._resync(pos - 1, seq + 1)
        trailer = self._find_trailer(pos, nxt[0] if nxt is not None else self.size, after=seq)
        return trailer.batch if trailer is not None else nxt[1].batch if nxt is not None else None

    def _find_trailer(self, lo: int, hi: int, seq: int | None = None,
                      after: int | None = None) -> Trailer | None:
        """The commit trailer ending at an aligned offset in ``(lo, hi]`` of batch ``seq``, or
        when it is None, of any batch after ``after`` (default: the last one settled)."""
        align = self.seg.data_start
        for p in self._search(TRAILER_MAGIC, lo, hi, (align - TRAILER.size) % align, align):
            try:
                t = parse_trailer(self._io.get(p, TRAILER.size), p + TRAILER.size, self.seg.salt,
                                  self.where(p))
            except CorruptBlockError:
                continue
            if t.batch == seq or seq is None and t.batch > (self._last_batch if after is None else after):
                return t
        return None

    def _find_salt(self) -> bool:
        """Learn the salt of a segment whose header is damaged from its first intact frame."""
        self.damage.append(f"{self.seg.path}: {self.seg.header_damage}")
        pos = max(self.committed, self.seg.data_start)
        for q in [pos, *self._search(FRAME_MAGIC, pos + 1, self.size, 0, SMALL_ALIGN)]:
            found = self._header(q)
            if found is not None:
                self.seg.salt = found[0].salt
                if q != pos:
                    self.damage.append(f"{self.where(pos)}: damaged bytes before the first intact frame")
                return True
        self.tail = f"{self.seg.path}: no intact frame after its damaged segment header"
        return False

    def _stop(self, start: int, at: int, mark: int, seq: int | None) -> None:
        """End the scan before the batch at ``start``: its commit cannot be read; what was noted
        about it is dropped. A writer killed mid-batch leaves a prefix of it (its write is cut
        short at the end of the file); anything else, unreadable bytes where the rest of the
        batch should be, may be a committed batch whose COMMIT frame was destroyed: ``doubtful``
        then names it, for the store to judge by the batches after it."""
        del self.damage[mark:]
        self.tail = (f"{self.where(start)}: {self.size - start} bytes hold no committed batch (unreadable "
                     f"from offset {at}); taken as an unfinished write")
        if seq is None and self._last_batch >= 0:
            seq = self._last_batch + 1  # nothing of it is readable: the next number, at least
        if seq is not None and not self._cut and self.size - at >= HEADER_SIZE:
            self.doubtful = (seq, self.where(start), self._nonzero(at))


    def _nonzero(self, pos: int) -> bool:
        """Whether any byte from ``pos`` to the end is not zero."""
        while pos < self.size:
            chunk = self._io.get(pos, _WINDOW // 2)
            if not chunk:
                return False
            if bytes(chunk).strip(b"\0"):
                return True
            pos += len(chunk)
        return False


def _entry_frame(e: DirEntry) -> Frame:
    try:
        key = key_from_bytes(e.key) if e.kind != FrameKind.RETIRE else None
    except CorruptBlockError:
        key = None
    return Frame(e.kind, key, e.offset, e.frame_len, len(e.key), e.seq, e.body_len, e.body_crc)


def _same(a: Frame, b: Frame) -> bool:
    """Whether two readings describe the same frame (damage aside)."""
    return (a.kind, a.key, a.offset, a.frame_len, a.key_len, a.seq, a.body_len, a.body_crc) == (
        b.kind, b.key, b.offset, b.frame_len, b.key_len, b.seq, b.body_len, b.body_crc)


def _tiles(frames: list[Frame], start: int, commit_pos: int | None) -> bool:
    """Whether ``frames`` cover the batch from ``start`` to its COMMIT frame with no hole."""
    pos = start
    for f in frames:
        if f.offset != pos:
            return False
        pos += f.frame_len
    return commit_pos is None or pos == commit_pos
