"""Reading a disk store's records (``tiercache.io.store``): concurrent positioned reads on a
thread pool, adjacent records merged into one read, every record checked against its frame and
its crc32 before anyone sees it.

A read is planned under the store's lock (``RecordReads.plan``: the index says where each
record lives, and the segments are held open for the read) and runs on the pool without it
(``RecordReads.submit``), so a compaction may retire a segment while a read still uses it.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, NamedTuple, Sequence

from ..errors import CorruptBlockError, StoreError, TiercacheError
from .frames import HEADER_SIZE, FrameKind, StoreKey, check_record, key_to_bytes, parse_header
from .index import StoreIndex
from .manifest import IndexEntry
from .segments import ScratchBuffer, Segment, segment_name

#: Largest read that adjacent records are merged into, in bytes.
_COALESCE_BYTES = 2 << 20

#: ``then(key, record, where)``: work done on the I/O thread right after a record is read.
Then = Callable[[StoreKey, memoryview, str], Any]


class _Read(NamedTuple):
    """One record to read."""

    segment: int
    offset: int
    key: StoreKey
    entry: IndexEntry
    future: Future


#: Runs of adjacent records, each with the segment it is read from (held open until read).
Plan = list[tuple[Segment, list[_Read]]]


class RecordReads:
    """Reads of the records ``index`` places in the store, ``io_threads`` at once."""

    def __init__(self, index: StoreIndex, io_threads: int) -> None:
        self.index = index
        self.executor = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="tiercache-disk")
        self._scratch = threading.local()  # each I/O thread's ScratchBuffer

    def plan(self, keys: Sequence[StoreKey]) -> tuple[Plan, list[Future]]:
        """The runs that read ``keys`` (their segments acquired) and one future per key.
        ``BlockNotFoundError`` for an absent key, ``CorruptBlockError`` for one that unknowable
        frames may hold a newer version of. The caller holds the store's lock."""
        reads = []
        for key in keys:
            if self.index.unresolved:
                self.index.check_unresolved(key)
            entry = self.index.entry(key)
            if entry.segment not in self.index.segments:
                missing = self.index.path / segment_name(entry.segment)
                raise StoreError(f"{key}: segment file {missing} is missing")
            reads.append(_Read(entry.segment, entry.offset, key, entry, Future()))
        jobs = [(self.index.segments[run[0].segment], run) for run in _coalesce(sorted(reads, key=_position))]
        for seg, _ in jobs:
            seg.acquire()
        return jobs, [r.future for r in reads]

    def submit(self, jobs: Plan, verify: bool, then: Then | None) -> None:
        """Start the reads ``plan`` made (without the store's lock)."""
        for seg, run in jobs:
            self.executor.submit(self._read_run, seg, run, verify, then)

    def _read_run(self, seg: Segment, run: list[_Read], verify: bool, then: Then | None) -> None:
        """Read a run of adjacent records with one read; resolve each one's future."""
        first, last = run[0].entry, run[-1].entry
        scratch = None
        if then is not None:
            scratch = getattr(self._scratch, "buffer", None)
            if scratch is None:
                scratch = self._scratch.buffer = ScratchBuffer()
        try:
            data = seg.read(first.offset, last.offset + last.span - first.offset, scratch)
        except (OSError, TiercacheError) as exc:
            if isinstance(exc, OSError):
                exc = StoreError(f"reading segment {seg.path} offset {first.offset}: {exc.strerror}")
            for r in run:
                r.future.set_exception(exc)
            return
        finally:
            seg.release()
        for _, offset, key, entry, future in run:
            where = f"segment {seg.path} offset {offset}"
            try:
                frame = data[offset - first.offset : offset - first.offset + entry.span]
                header, key_bytes = parse_header(frame, where)
                if (header.kind != FrameKind.PUT or key_bytes != key_to_bytes(key)
                        or header.body_len != entry.record_len):
                    raise CorruptBlockError(f"{where}: frame holds {key_bytes!r}, expected the record of "
                                            f"{key}")
                record = frame[header.body_offset : header.body_offset + entry.record_len]
                if verify:
                    check_record(record, entry.crc, where)
                future.set_result(then(key, record, where) if then is not None else record)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
                future.set_exception(exc)


def read_record(seg: Segment, offset: int, key_len: int, record_len: int, crc: int) -> memoryview:
    """Read and verify the record of the PUT frame at ``offset`` of ``seg`` (while scanning)."""
    data = seg.read(offset, HEADER_SIZE + key_len + record_len)
    record = data[HEADER_SIZE + key_len :]
    check_record(record, crc, f"segment {seg.path} offset {offset}")
    return record


def _position(r: _Read) -> tuple[int, int]:
    return r.segment, r.offset


def _coalesce(reads: list[_Read]) -> list[list[_Read]]:
    """Split reads sorted by position into runs of adjacent frames spanning at most
    ``_COALESCE_BYTES``: one large read is much faster than many small ones."""
    runs: list[list[_Read]] = []
    for r in reads:
        if runs:
            prev, start = runs[-1][-1], runs[-1][0].offset
            if (r.segment == prev.segment and r.offset == prev.offset + prev.entry.frame_len
                    and r.offset + r.entry.span - start <= _COALESCE_BYTES):
                runs[-1].append(r)
                continue
        runs.append([r])
    return runs
