"""``DiskStore``: a crash-safe, persistent store of block records in large segment files.

- **Layout.** Records go into append-only segment files (``seg-NNNNNNNN.tcseg``, up to
  ``segment_bytes`` each) as frames (``tiercache.io.frames``); each write is a batch of frames
  closed by a COMMIT frame holding the batch's directory (``tiercache.io.commits``) and, with
  ``sync=True``, one ``fdatasync``. A batch is all or nothing.
- **Index.** In memory: key -> (segment, offset, length, crc32, seq), for ``BlockKey``\\ s and for
  the parts of saved contexts (``ContextPart``). Checkpointed to a checksummed ``manifest.json``
  (``tiercache.io.manifest``) that is checked against the segments before it is used, and
  rebuilt by scanning segments past the checkpoint on open, so a writer killed at any point
  loses at most its uncommitted batch.
- **Damage.** Scans find frames again after damaged bytes (``tiercache.io.scan``): every intact
  committed record after the damage is kept, a damaged one is listed in ``damage`` and raises
  ``CorruptBlockError`` naming the file and offset when read, and a newer version is never
  shadowed by an older one. Where damage makes frames unknowable, reads they could affect are
  refused rather than served possibly stale.
- **Reads.** Concurrent positioned reads on a thread pool (``O_DIRECT`` where the filesystem
  allows it); every record's crc32 is checked and a mismatch raises ``CorruptBlockError`` naming
  the segment file and offset. Nothing is ever returned unverified unless asked (``verify=False``,
  for callers that verify while decoding). A saved context is read as one version or not at all.
- **Capacity.** ``budget_bytes`` bounds the bytes of live frames: a write that does not fit raises
  ``CapacityError`` and stores nothing. The store evicts nothing itself; which saved contexts
  make room is the context cache's policy (``tiercache.contexts.eviction``). Overwritten and
  deleted records leave dead bytes that compaction reclaims (copying a segment's live records to
  the active segment, recording its retirement in the log, then removing it) whenever the files
  exceed the budget. A segment is removed only once the writer's own index holds nothing in it.
- **Processes.** One writer (an exclusive ``flock``) and any number of readers
  (``readonly=True``), which see what was committed when they opened or last called ``refresh``:
  always one state the writer passed through. A reader that finds a segment was created and
  compacted away between two refreshes reloads its index.

Everything on disk is binary structs or JSON; no pickle.
"""

from __future__ import annotations

import errno
import os
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, NamedTuple, Sequence

from ..blocks import BlockKey
from ..errors import (
    BlockNotFoundError,
    CapacityError,
    CorruptBlockError,
    StoreError,
    StoreWarning,
    TiercacheError,
)
from .commits import TRAILER, DirEntry, commit_length, directory_length, pack_commit, parse_trailer
from .frames import (
    HEADER_SIZE,
    ContextPart,
    FrameKind,
    StoreKey,
    check_context_key,
    check_record,
    frame_length,
    key_to_bytes,
    pack_frame,
    parse_header,
    record_crc,
)
from .lockfile import WriterLock
from .manifest import (
    IndexEntry,
    Manifest,
    read_manifest,
    remove_stale_temporaries,
    write_manifest,
)
from .record import prefix_size, record_length
from .scan import Batch, SegmentScan
from .segments import ScratchBuffer, Segment, fsync_dir, segment_id, segment_name

#: Bytes of records copied per compaction batch.
_COMPACT_BATCH = 64 << 20
#: Largest read that adjacent records are merged into, in bytes.
_COALESCE_BYTES = 2 << 20
#: Compaction only rewrites segments at least this dead, so a store kept full of live records
#: does not copy the same records over and over.
_COMPACT_MIN_DEAD = 0.25
#: Times a reader lists and opens the segments again when the writer's compaction removes one
#: under it, before it gives up.
_OPEN_TRIES = 20


@dataclass(frozen=True, slots=True)
class _Frame:
    """A frame to write: PUT (with its record), DELETE, or RETIRE of segment ``segment``;
    ``seq`` None means the batch's own."""

    kind: FrameKind
    key: StoreKey | None
    record: bytes | memoryview = b""
    seq: int | None = None
    segment: int = 0


class _Vanished(Exception):
    """A segment file was removed (by the writer's compaction) while a reader opened it."""


class DiskStore:
    """A persistent store of records (bytes) under ``BlockKey``\\ s and saved-context names.

    ``path``: the store's directory (created for a writer). ``budget_bytes``: bytes of live
    frames it may hold. ``readonly``: open as a reader (no lock, no writes). ``segment_bytes``:
    size at which a new segment file is started. ``align``: alignment of records in bytes (a
    multiple of 512; 4096 suits every common filesystem). ``direct``: ``"auto"`` uses
    ``O_DIRECT`` where supported, ``False`` never. ``io_threads``: reads in flight at once.
    ``sync``: ``fdatasync`` every batch (off only for throwaway stores). ``checkpoint_every``:
    batches between manifest checkpoints.
    """

    def __init__(self, path: str | os.PathLike, budget_bytes: int, *, readonly: bool = False,
                 segment_bytes: int = 256 << 20, align: int = 4096, direct: Literal["auto"] | bool = "auto",
                 io_threads: int = 8, sync: bool = True, checkpoint_every: int = 1024) -> None:
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
            raise StoreError(f"budget_bytes must be an int >= 0, got {budget_bytes!r}")
        if align < 512 or align & (align - 1):
            raise StoreError(f"align must be a power of two >= 512 bytes, got {align}")
        self.path = Path(path)
        self.budget_bytes = budget_bytes
        self.readonly = readonly
        self.segment_bytes = segment_bytes
        self.align = align
        self.direct = direct is not False
        self.sync = sync
        self.checkpoint_every = checkpoint_every
        #: Why the index was rebuilt from the segments on open ("" if the manifest was current).
        self.recovery_note = ""
        #: Damaged frames and regions found (each naming its segment file and offset), since open.
        self.damage: list[str] = []
        #: Times ``refresh`` loaded the index afresh (a segment came and went in between).
        self.reloads = 0
        #: Why the last periodic checkpoint, or automatic compaction, failed ("" if it did not).
        self.checkpoint_error = ""
        self.compaction_error = ""

        self._lock = threading.RLock()
        self._scratch = threading.local()  # each I/O thread's ScratchBuffer
        self._reset()
        self._active: Segment | None = None
        self._batches_since_checkpoint = 0
        self._writer_lock: WriterLock | None = None
        self._closed = False

        self._open_directory()
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="tiercache-disk")

    def _reset(self) -> None:
        """Empty the in-memory index (before loading it)."""
        self._index: dict[StoreKey, IndexEntry] = {}
        self._by_seq: dict[int, set[BlockKey]] = {}
        self._contexts: dict[str, int] = {}  # name -> number of parts
        self._segments: dict[int, Segment] = {}
        self._committed: dict[int, int] = {}  # segment id -> bytes committed
        self._last_batch: dict[int, int] = {}  # segment id -> number of its last committed batch
        self._live: dict[int, int] = {}  # segment id -> bytes of live PUT frames
        self._seq = 0
        self._next_segment = 1  # segment ids are never reused: readers may hold removed ones open
        #: Segments that RETIRE frames declare dead (their live records were copied forward).
        self._retired: set[int] = set()
        #: Retired segments whose file could not be removed: their tombstones still matter.
        self._zombies: set[int] = set()
        #: Segments compaction must leave alone (they hold damage it cannot copy), and why.
        self._pinned: dict[int, str] = {}
        #: (place, highest seq) of frames damage made unknowable (see ``_check_unresolved``).
        self._unresolved: list[tuple[str, int]] = []
        #: Batches at a segment's end whose commit was unreadable (not cut short): segment id ->
        #: ``SegmentScan.doubtful``; the batch numbers replayed since; the places judged already.
        self._doubtful: dict[int, tuple[int, str, bool]] = {}
        self._replayed: set[int] = set()
        self._judged: set[str] = set()

    # ------------------------------------------------------------------ opening and recovery

    def _open_directory(self) -> None:
        if self.readonly:
            if not self.path.is_dir():
                raise StoreError(f"disk store directory {self.path} does not exist or is not a directory")
        else:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create disk store directory {self.path}: {exc.strerror}") from exc
            if not os.access(self.path, os.R_OK | os.W_OK | os.X_OK):
                raise StoreError(f"disk store directory {self.path} is not readable and writable")
            self._writer_lock = WriterLock(self.path)
        try:
            self._load()
            if not self.readonly:
                self._clean_up()
        except BaseException:
            self._release()
            raise

    def _load(self) -> None:
        """Load the index: from the manifest if it checks out, plus the batches committed after
        it; else by scanning every segment. A reader whose segments the writer's compaction
        removes while it opens them starts again."""
        for attempt in range(_OPEN_TRIES):
            try:
                # A reader may race the writer's compaction: it trusts a manifest that disagrees
                # with the directory listing only once re-reading no longer helps.
                self._load_once(insist=not self.readonly or attempt >= _OPEN_TRIES // 2)
                return
            except _Vanished:
                for seg in self._segments.values():
                    seg.retire()
                self._reset()
        raise StoreError(f"disk store {self.path}: segment files kept vanishing while opening it "
                         f"({_OPEN_TRIES} tries); is a writer compacting it continuously?")

    def _list_segments(self) -> dict[int, Path]:
        try:
            return {segment_id(p): p for p in self.path.iterdir() if segment_id(p) is not None}
        except OSError as exc:
            raise StoreError(f"cannot list disk store directory {self.path}: {exc.strerror}") from exc

    def _open_segment(self, seg_id: int, path: Path) -> Segment:
        try:
            return Segment(path, seg_id, self.align, self.direct)
        except FileNotFoundError:
            if self.readonly:
                raise _Vanished from None
            raise StoreError(f"segment {path} vanished while the store was opening it") from None

    def _load_once(self, insist: bool) -> None:
        got = read_manifest(self.path)
        files = self._list_segments()
        manifest, why, warn = got.manifest, got.problem, got.present
        if manifest is not None:
            why, warn = self._listing_problem(manifest, files)
            if why and not insist:
                raise _Vanished
        for seg_id, path in sorted(files.items()):
            self._segments[seg_id] = self._open_segment(seg_id, path)
        if manifest is not None and not why:
            why, warn = self._segments_problem(manifest), True
        if why and warn:
            warnings.warn(f"disk store {self.path}: ignoring its manifest ({why}); the index is rebuilt by "
                          "scanning the segments", StoreWarning, stacklevel=5)
        whole = manifest  # ignored or not, a whole manifest is the writer's word on what committed
        if why:
            manifest = Manifest()
        self.recovery_note = why
        self._seq = manifest.seq
        self._next_segment = max([manifest.next_segment] + [s + 1 for s in files])
        self._unresolved = list(whole.unresolved) if whole is not None else []
        for seg in self._segments.values():
            self._committed[seg.id] = seg.data_start
            self._last_batch[seg.id] = 0
            self._live[seg.id] = 0
        for seg_id, (end, batch) in manifest.segments.items():
            self._committed[seg_id], self._last_batch[seg_id] = end, batch
        for key, entry in manifest.entries.items():
            self._apply_put(key, entry)
        for seg in list(self._segments.values()):
            start = self._committed[seg.id]
            if start > seg.size():
                self._note(f"{seg.path} is shorter ({seg.size()} bytes) than committed ({start}); "
                           "records past its end read as damaged")
                continue
            self._scan(seg, start)
            if start < self._committed[seg.id] and not self.recovery_note:
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
            seg = self._segments[seg_id]
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
            seg = self._segments.get(e.segment)
            if seg is None or e.offset < seg.data_start or e.offset + e.frame_len > end:
                return f"its entry of {key} lies outside the committed part of segment {e.segment}"
        return ""

    def _scan(self, seg: Segment, start: int) -> None:
        """Replay the committed batches of ``seg`` from ``start``."""
        scan = SegmentScan(seg, start)
        for batch in scan.batches():
            self._replay(seg.id, batch)
            self._committed[seg.id] = batch.end
            self._last_batch[seg.id] = batch.seq
        self.damage += scan.damage
        self._unresolved += scan.unresolved
        if scan.doubtful is not None and scan.doubtful[1] not in self._judged:
            self._doubtful[seg.id] = scan.doubtful
        if scan.tail and not self.readonly:  # a reader may simply be watching a batch being written
            self._note(scan.tail)

    def _check_claims(self, manifest: Manifest) -> None:
        """After a scan that ignored ``manifest`` (whole, but contradicting the segments): where
        it records more committed than the scan could read, damage destroyed committed batches
        whose frames are unknowable."""
        for seg_id, (end, batch) in manifest.segments.items():
            seg = self._segments.get(seg_id)
            if seg is not None and self._committed[seg_id] < end:
                where = f"segment {seg.path} offset {self._committed[seg_id]}"
                self._unresolved.append((where, batch))
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
                self._unresolved.append(verdict)
                self.damage.append(f"{where}: batch {seq} was committed (later batches or bytes follow) but "
                                   "damage destroyed its commit; its frames are unknowable")
        if not self._doubtful:
            self._replayed.clear()

    def _note(self, text: str) -> None:
        self.recovery_note = f"{self.recovery_note}; {text}" if self.recovery_note else text

    def _replay(self, seg_id: int, batch: Batch) -> None:
        for f in batch.frames:
            if f.kind == FrameKind.RETIRE:
                self._retired.add(f.body_len)
            elif f.key is None:
                continue  # unknowable: the batch is unresolved
            elif f.kind == FrameKind.PUT:
                entry = IndexEntry(seg_id, f.offset, f.frame_len, f.key_len, f.body_len, f.body_crc, f.seq)
                current = self._index.get(f.key)
                if current is None or entry.newer_than(current):
                    self._apply_put(f.key, entry)
            else:
                self._delete_older(f.key, f.seq)
        self._seq = max(self._seq, batch.seq)
        self._replayed.add(batch.seq)

    def _clean_up(self) -> None:
        """Writer, after loading: remove what failures left behind. Temporary manifests; empty
        segments (a write failed before anything was committed); segments RETIRE frames declare
        dead, once this index confirms nothing live is left in them."""
        remove_stale_temporaries(self.path)
        for seg in list(self._segments.values()):
            empty = seg.size() <= seg.data_start and self._live[seg.id] == 0
            if empty or (seg.id in self._retired and self._live[seg.id] == 0):
                try:
                    self._remove_segment(seg)
                except StoreError as exc:
                    self._note(str(exc))

    def _remove_segment(self, seg: Segment) -> None:
        """Forget ``seg`` and remove its file (the caller has proven it holds nothing live)."""
        self._forget_segment(seg.id)
        seg.retire()
        try:
            os.unlink(seg.path)
            fsync_dir(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._zombies.add(seg.id)  # its tombstones still hide older records in older segments
            raise StoreError(f"could not remove dead segment {seg.path}: {exc.strerror}") from exc
        self._zombies.discard(seg.id)

    # ------------------------------------------------------------------ index bookkeeping

    def _apply_put(self, key: StoreKey, entry: IndexEntry) -> None:
        old = self._index.get(key)
        if old is not None:
            self._live[old.segment] = self._live.get(old.segment, 0) - old.frame_len
        elif isinstance(key, BlockKey):
            self._by_seq.setdefault(key.seq, set()).add(key)
        else:
            self._contexts[key.context] = self._contexts.get(key.context, 0) + 1
        self._index[key] = entry
        self._live[entry.segment] = self._live.get(entry.segment, 0) + entry.frame_len

    def _delete_older(self, key: StoreKey, seq: int) -> None:
        """Apply a DELETE of sequence number ``seq``: it removes only an older record (compaction
        carries old DELETE frames forward, behind newer records of the same key)."""
        current = self._index.get(key)
        if current is not None and current.seq < seq:
            self._apply_delete(key)

    def _apply_delete(self, key: StoreKey) -> None:
        entry = self._index.pop(key)
        self._live[entry.segment] -= entry.frame_len
        if isinstance(key, BlockKey):
            keys = self._by_seq[key.seq]
            keys.discard(key)
            if not keys:
                del self._by_seq[key.seq]
        else:
            self._contexts[key.context] -= 1
            if not self._contexts[key.context]:
                del self._contexts[key.context]

    # ------------------------------------------------------------------ sizes

    @property
    def capacity_bytes(self) -> int:
        """Bytes of live frames the store may hold (``budget_bytes``)."""
        return self.budget_bytes

    @property
    def used_bytes(self) -> int:
        """Bytes of live frames (records plus frame headers and alignment padding)."""
        with self._lock:
            return sum(self._live.values())

    @property
    def disk_bytes(self) -> int:
        """Bytes of all segment files, dead frames awaiting compaction included."""
        with self._lock:
            return sum(seg.size() for seg in self._segments.values())

    def frame_bytes(self, key: StoreKey, record_len: int) -> int:
        """Bytes a record of ``record_len`` bytes under ``key`` takes in the store."""
        return frame_length(FrameKind.PUT, len(key_to_bytes(key)), record_len, self.align)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def keys(self) -> list[StoreKey]:
        with self._lock:
            return list(self._index)

    def entry(self, key: StoreKey) -> IndexEntry:
        """Where ``key``'s record lives; ``BlockNotFoundError`` if absent."""
        try:
            return self._index[key]
        except KeyError:
            raise BlockNotFoundError(f"disk store {self.path} does not hold {key}") from None

    @property
    def executor(self) -> ThreadPoolExecutor:
        """The store's I/O threads, for work that belongs next to the I/O: encoding records
        before a write, decoding them after a read (both release the GIL in torch and zlib)."""
        return self._pool

    def segment_path(self, seg_id: int) -> Path:
        return self.path / segment_name(seg_id)

    # ------------------------------------------------------------------ reads

    def read_async(self, keys: Sequence[StoreKey], verify: bool = True,
                   then: Callable[[StoreKey, memoryview, str], Any] | None = None) -> list[Future]:
        """Start reading the records of ``keys`` all at once; one future per key, resolving to
        the record's bytes (a ``memoryview``) or raising ``CorruptBlockError``/``StoreError``.
        ``BlockNotFoundError`` at once for an absent key.

        ``then(key, record, where)``, if given, runs on the I/O thread right after the read (to
        decode there, in parallel) and the future resolves to its result; ``where`` names the
        segment file and offset for its error messages. The record it gets lives in the thread's
        reusable read buffer: valid only during the call, so ``then`` must copy what it keeps
        (decoding does). That saves the page faults of fresh memory, about half the time of a
        large read. ``verify=False`` skips the store's crc
        check, for a ``then`` that checks the record itself (``decode_record`` does)."""
        with self._lock:
            self._check_open()
            reads = []
            for key in keys:
                if self._unresolved:
                    self._check_unresolved(key)
                entry = self.entry(key)
                seg = self._segments.get(entry.segment)
                if seg is None:
                    raise StoreError(f"{key}: segment file {self.segment_path(entry.segment)} is missing")
                reads.append(_Read(entry.segment, entry.offset, key, entry, Future()))
            jobs = [(self._segments[run[0].segment], run) for run in _coalesce(sorted(reads, key=_position))]
            for seg, _ in jobs:
                seg.acquire()
        for seg, run in jobs:
            self._pool.submit(self._read_run, seg, run, verify, then)
        return [r.future for r in reads]

    def get_many(self, keys: Sequence[StoreKey], verify: bool = True) -> list[memoryview]:
        """The records of ``keys``, read concurrently (see ``read_async``)."""
        futures = self.read_async(keys, verify)
        return [f.result() for f in futures]

    def get(self, key: StoreKey, verify: bool = True) -> memoryview:
        return self.get_many([key], verify)[0]

    def _check_unresolved(self, key: StoreKey) -> None:
        """``CorruptBlockError`` if frames that damage made unknowable may hold a newer version of
        ``key`` than the index has (or hold ``key`` at all, if the index has none): every lost
        frame was written at or before its batch's sequence number."""
        entry = self._index.get(key)
        seq = entry.seq if entry is not None else -1
        for where, highest in self._unresolved:
            if seq <= highest:
                raise CorruptBlockError(
                    f"{where}: damaged frames of unknown keys (batch {highest} or older) may hold a newer "
                    f"version of {key} than the one indexed; it is not served"
                )

    def _read_run(self, seg: Segment, run: list["_Read"], verify: bool,
                  then: Callable[[StoreKey, memoryview, str], Any] | None) -> None:
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

    def _read_record(self, seg: Segment, offset: int, key_len: int, record_len: int, crc: int) -> memoryview:
        """Read and verify the record of the PUT frame at ``offset`` (used while scanning)."""
        data = seg.read(offset, HEADER_SIZE + key_len + record_len)
        record = data[HEADER_SIZE + key_len :]
        check_record(record, crc, f"segment {seg.path} offset {offset}")
        return record

    # ------------------------------------------------------------------ writes

    def put_many(self, items: Sequence[tuple[StoreKey, bytes | memoryview]]) -> list[int]:
        """Store records (each a whole ``tiercache.io.record`` record) under their keys, as one
        atomic batch; return the bytes each takes on disk. Replaces existing records of the same
        keys. ``CapacityError`` (nothing stored) if they do not fit in the budget."""
        frames = [_Frame(FrameKind.PUT, key, _checked_record(key, rec)) for key, rec in items]
        with self._lock:
            self._check_room(frames)
            entries = self._commit(frames)
            self._maybe_compact()
        return [e.frame_len for e in entries]

    def delete(self, keys: Iterable[StoreKey], sync: bool = True) -> None:
        """Remove ``keys`` (one batch); ``BlockNotFoundError`` (nothing removed) if one is absent.
        ``sync=False`` skips the fsync: a crash may then bring the records back (never damage
        them), which is fine for blocks a later open discards anyway."""
        keys = list(keys)
        with self._lock:
            for key in keys:
                self.entry(key)
            self._commit([_Frame(FrameKind.DELETE, key) for key in keys], sync)
            self._maybe_compact()

    def delete_seq(self, seq: int) -> int:
        """Remove every block of sequence ``seq``; return how many there were."""
        with self._lock:
            keys = sorted(self._by_seq.get(seq, ()))
            if keys:
                self.delete(keys)
            return len(keys)

    def block_keys(self, seq: int | None = None) -> list[BlockKey]:
        """The stored ``BlockKey``\\ s, of sequence ``seq`` only if given."""
        with self._lock:
            if seq is not None:
                return sorted(self._by_seq.get(seq, ()))
            return sorted(k for keys in self._by_seq.values() for k in keys)

    # ------------------------------------------------------------------ saved contexts

    def save_context(self, name: str, records: Sequence[bytes | memoryview]) -> int:
        """Store a context as the ordered ``records`` under ``name`` (e.g. a ``content_key``),
        atomically replacing any context of that name; return the bytes it takes.
        ``CapacityError`` (nothing stored) if it does not fit in the budget."""
        check_context_key(name)
        if not records:
            raise StoreError(f"context {name!r}: nothing to save")
        frames = [_Frame(FrameKind.PUT, ContextPart(name, i), _checked_record(name, r))
                  for i, r in enumerate(records)]
        with self._lock:
            old = self._contexts.get(name, 0)
            # Parts past the new length go in the same batch, so the replacement is atomic.
            frames += [_Frame(FrameKind.DELETE, ContextPart(name, i)) for i in range(len(records), old)]
            self._check_room(frames)
            entries = self._commit(frames)
            self._maybe_compact()
        return sum(e.frame_len for e in entries)

    def load_context(self, name: str, verify: bool = True,
                     then: Callable[[StoreKey, memoryview, str], Any] | None = None) -> list[Any]:
        """The records of context ``name``, in order, read concurrently (``verify`` and ``then``
        as in ``read_async``); ``BlockNotFoundError`` if there is no such context,
        ``CorruptBlockError`` if its parts are not those of one save."""
        with self._lock:
            count = self._contexts.get(name)
            if count is None:
                if self._unresolved:  # the unknowable frames may have held it
                    self._check_unresolved(ContextPart(name, 0))
                raise BlockNotFoundError(f"disk store {self.path} holds no context {name!r}")
            parts = [ContextPart(name, i) for i in range(count)]
            entries = [self._index.get(p) for p in parts]
            for i, e in enumerate(entries):
                # One save writes every part in one batch, under one sequence number (copies
                # keep it): anything else would mix two saves.
                if e is None or e.seq != entries[0].seq:
                    odd = (f"segment {self.segment_path(e.segment)} offset {e.offset} holds part {i} of "
                           f"save {e.seq}, part 0 is of save {entries[0].seq}" if e is not None
                           else f"part {i} is missing")
                    raise CorruptBlockError(f"context {name!r} of {count} parts is not one save: {odd}")
            futures = self.read_async(parts, verify, then)
        return [f.result() for f in futures]

    def delete_context(self, name: str) -> None:
        """Remove context ``name`` (durably); ``BlockNotFoundError`` if absent."""
        with self._lock:
            count = self._contexts.get(name)
            if count is None:
                raise BlockNotFoundError(f"disk store {self.path} holds no context {name!r}")
            self._commit([_Frame(FrameKind.DELETE, ContextPart(name, i)) for i in range(count)])
            self._maybe_compact()

    def contexts(self) -> list[str]:
        """Names of the saved contexts, least recently saved first."""
        with self._lock:
            return sorted(self._contexts, key=self._saved_seq)

    def _saved_seq(self, name: str) -> int:
        """Sequence number of the save of context ``name`` (-1 if its first part is lost)."""
        entry = self._index.get(ContextPart(name, 0))
        return entry.seq if entry is not None else -1

    def has_context(self, name: str) -> bool:
        return name in self._contexts

    def _check_room(self, frames: list[_Frame]) -> None:
        """``CapacityError`` unless the PUT ``frames`` fit in the budget (beside the live frames
        they do not replace)."""
        self._check_writable()
        need = 0
        for f in frames:
            if f.kind != FrameKind.PUT:
                continue
            need += self.frame_bytes(f.key, len(f.record))
            old = self._index.get(f.key)
            need -= old.frame_len if old is not None else 0
        if self.used_bytes + need > self.budget_bytes:
            raise CapacityError(
                f"disk store {self.path}: {need} more bytes do not fit; {self.used_bytes} of budget_bytes="
                f"{self.budget_bytes} hold live records: delete some, or open the store with a larger budget"
            )

    def _commit(self, frames: list[_Frame], sync: bool = True) -> list[IndexEntry]:
        """Append ``frames`` and a COMMIT frame as one batch, make it durable, then apply it to the
        index. Returns the PUT frames' entries. On a write error nothing is applied, the partial
        batch is cut off and later batches go to a fresh segment."""
        self._check_writable()
        if not frames:
            return []
        seq = self._seq + 1
        frames = sorted(frames, key=lambda f: f.kind)  # PUTs first, so every PUT starts aligned
        encoded = [(f, key_to_bytes(f.key) if f.key is not None else b"") for f in frames]
        lengths = [frame_length(f.kind, len(k), len(f.record), self.align) for f, k in encoded]
        # The COMMIT frame's exact length depends on where it starts; this bounds it.
        dir_len = directory_length(len(encoded), sum(len(k) for _, k in encoded))
        seg = self._active_segment(sum(lengths) + commit_length(0, dir_len, self.align) + self.align)
        start = pos = self._committed[seg.id]
        parts: list[bytes | memoryview] = []
        entries: list[DirEntry] = []
        applied: list[tuple[_Frame, IndexEntry | None]] = []
        for (f, key_bytes), length in zip(encoded, lengths):
            fseq = f.seq if f.seq is not None else seq
            crc = record_crc(f.record) if f.kind == FrameKind.PUT else 0
            body_len = len(f.record) if f.kind != FrameKind.RETIRE else f.segment
            parts += pack_frame(f.kind, fseq, seq, seg.salt, key_bytes, f.record, body_len, crc, length)
            entries.append(DirEntry(f.kind, key_bytes, pos, length, fseq, body_len, crc))
            applied.append((f, IndexEntry(seg.id, pos, length, len(key_bytes), len(f.record), crc, fseq)
                            if f.kind == FrameKind.PUT else None))
            pos += length
        commit = pack_commit(pos, seq, seg.salt, entries, self.align)
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
        self._committed[seg.id] = pos
        self._last_batch[seg.id] = seq
        self._seq = seq
        for f, entry in applied:
            if entry is not None:
                self._apply_put(f.key, entry)
            elif f.kind == FrameKind.DELETE:
                self._delete_older(f.key, f.seq if f.seq is not None else seq)
        self._batches_since_checkpoint += 1
        if self._batches_since_checkpoint >= self.checkpoint_every:
            try:
                self.checkpoint()
            except StoreError as exc:
                # The batch is committed all the same (the segments are the truth); the
                # checkpoint is retried after the next batches.
                self.checkpoint_error = str(exc)
        return [e for _, e in applied if e is not None]

    def _active_segment(self, batch_bytes: int) -> Segment:
        """The segment to append a batch of at most ``batch_bytes`` to, starting a new one when
        the active one would outgrow ``segment_bytes`` (a batch never spans segments)."""
        seg = self._active
        if seg is not None and (self._committed[seg.id] == seg.data_start
                                or self._committed[seg.id] + batch_bytes <= self.segment_bytes):
            return seg
        seg_id = self._next_segment
        self._next_segment += 1
        salt = int.from_bytes(os.urandom(4), "little")
        seg = Segment(self.segment_path(seg_id), seg_id, self.align, self.direct, create_salt=salt)
        try:
            fsync_dir(self.path)  # the new file's directory entry must survive a crash too
        except OSError as exc:
            self._remove_segment(seg)
            raise StoreError(f"cannot make segment {seg.path} durable: {exc.strerror}") from exc
        self._segments[seg_id] = seg
        self._committed[seg_id] = seg.data_start
        self._last_batch[seg_id] = 0
        self._live[seg_id] = 0
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
                self._remove_segment(seg)
            except StoreError:
                pass  # an empty segment: the next writer removes it

    # ------------------------------------------------------------------ compaction

    def compact(self, target_bytes: int | None = None) -> int:
        """Reclaim dead space until the segment files take at most ``target_bytes`` (default: the
        budget), emptiest segments first; return the bytes reclaimed. Segments holding damaged
        live records are left as they are (see ``compaction_error``)."""
        with self._lock:
            self._check_writable()
            target = self.budget_bytes if target_bytes is None else target_bytes
            before = self.disk_bytes
            candidates = sorted(
                (s for s in self._segments.values()
                 if s is not self._active and s.id not in self._pinned
                 and s.size() - self._live[s.id] >= _COMPACT_MIN_DEAD * s.size()),
                key=lambda s: self._live[s.id] / max(1, s.size()),
            )
            for seg in candidates:
                if self.disk_bytes <= target:
                    break
                self._compact_segment(seg)
            return before - self.disk_bytes

    def _compact_segment(self, seg: Segment) -> None:
        """Copy the live records of ``seg`` (and the tombstones older segments still need) to the
        active segment, record its retirement, then remove it."""
        older_exists = any(s < seg.id for s in [*self._segments, *self._zombies])
        live = self._live[seg.id]
        copied = 0
        batch: list[_Frame] = []
        batch_bytes = 0
        scan = SegmentScan(seg, seg.data_start, limit=self._committed[seg.id])
        for found in scan.batches():
            for f in found.frames:
                entry = self._index.get(f.key) if f.key is not None else None
                here = entry is not None and (entry.segment, entry.offset) == (seg.id, f.offset)
                if f.kind == FrameKind.PUT and here:
                    try:
                        if f.damage:
                            raise CorruptBlockError(f.damage)
                        record = self._read_record(seg, f.offset, f.key_len, f.body_len, f.body_crc)
                    except CorruptBlockError as exc:
                        return self._pin(seg, f"it holds a damaged live record ({exc})")
                    batch.append(_Frame(FrameKind.PUT, f.key, bytes(record), f.seq))
                    batch_bytes += f.frame_len
                    copied += f.frame_len
                elif f.kind == FrameKind.DELETE and older_exists:
                    # It may still hide an older record of its key in an older segment.
                    batch.append(_Frame(FrameKind.DELETE, f.key, seq=f.seq))
                elif f.kind == FrameKind.RETIRE and f.body_len in self._zombies:
                    batch.append(_Frame(FrameKind.RETIRE, None, segment=f.body_len))
            if batch_bytes >= _COMPACT_BATCH:
                self._commit(batch)
                batch, batch_bytes = [], 0
        if scan.unresolved or scan.committed != self._committed[seg.id] or copied != live:
            self._commit(batch)
            return self._pin(seg, "damage hides some of its frames; its live records could not all be found")
        # Proven dead by this index: nothing live is left in it. The log says so before the
        # manifest stops naming it and before the file goes.
        self._commit(batch + [_Frame(FrameKind.RETIRE, None, segment=seg.id)])
        self._retired.add(seg.id)
        self._forget_segment(seg.id)
        self.checkpoint()
        seg.retire()
        try:
            os.unlink(seg.path)
            fsync_dir(self.path)
        except OSError as exc:
            self._zombies.add(seg.id)
            raise StoreError(f"compaction could not remove {seg.path}: {exc.strerror}") from exc

    def _pin(self, seg: Segment, why: str) -> None:
        self._pinned[seg.id] = why
        self.compaction_error = f"compaction leaves {seg.path} as it is: {why}"

    def _forget_segment(self, seg_id: int) -> None:
        del self._segments[seg_id]
        del self._committed[seg_id]
        del self._last_batch[seg_id]
        del self._live[seg_id]
        if self._active is not None and self._active.id == seg_id:
            self._active = None

    # ------------------------------------------------------------------ lifecycle

    def checkpoint(self) -> None:
        """Write the manifest now (atomically)."""
        with self._lock:
            self._check_writable()
            segments = {s: (end, self._last_batch[s]) for s, end in self._committed.items()}
            write_manifest(self.path, Manifest(self._seq, self._next_segment, segments, dict(self._index),
                                               list(self._unresolved)))
            self._batches_since_checkpoint = 0
            self.checkpoint_error = ""

    def refresh(self) -> None:
        """Reader: pick up batches committed since open (or the last refresh). If the writer
        started and compacted away a segment in between, the index is loaded afresh (its
        tombstones may be gone with it); either way the reader sees one committed state."""
        with self._lock:
            self._check_open()
            files = self._list_segments()
            top = max(files, default=0)
            try:
                if any(s not in files for s in range(self._next_segment, top + 1)):
                    raise _Vanished
                for seg_id in sorted(s for s in files if s >= self._next_segment):
                    self._segments[seg_id] = self._open_segment(seg_id, files[seg_id])
                    self._next_segment = seg_id + 1
                    self._committed[seg_id] = self._segments[seg_id].data_start
                    self._last_batch[seg_id] = 0
                    self._live.setdefault(seg_id, 0)
            except _Vanished:
                return self._reload()
            for seg_id, seg in sorted(self._segments.items()):
                self._scan(seg, self._committed[seg_id])
            self._judge_doubtful(-1)
            for seg_id in [s for s in self._segments if s not in files and not self._live[s]]:
                self._segments[seg_id].retire()  # compacted away and nothing of it in use: let go
                self._forget_segment(seg_id)

    def _reload(self) -> None:
        self.reloads += 1
        old = list(self._segments.values())
        self._reset()
        self.damage = []
        try:
            self._load()
        finally:
            for seg in old:  # reads in flight keep theirs open until they finish
                seg.retire()

    def close(self) -> None:
        """Checkpoint (writer), finish reads in flight, close files, release the writer lock."""
        with self._lock:
            if self._closed:
                return
            try:
                if not self.readonly:
                    self.checkpoint()
            finally:
                self._closed = True
                self._pool.shutdown(wait=True)
                self._release()

    def _release(self) -> None:
        for seg in self._segments.values():
            seg.retire()
        if self._writer_lock is not None:
            self._writer_lock.release()
            self._writer_lock = None

    def __enter__(self) -> "DiskStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"disk store {self.path} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self.readonly:
            raise StoreError(f"disk store {self.path} was opened read-only")

    def _maybe_compact(self) -> None:
        # Called after each write batch, never from inside one (compaction itself commits).
        if self.disk_bytes > self.budget_bytes:
            try:
                self.compact()
            except TiercacheError as exc:
                # The write succeeded; a segment that cannot be compacted (damaged, or the disk
                # is full) keeps its space until an explicit compact() reports why.
                self.compaction_error = str(exc)


class _Read(NamedTuple):
    """One record to read."""

    segment: int
    offset: int
    key: StoreKey
    entry: IndexEntry
    future: Future


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


def _checked_record(key: object, record: bytes | memoryview) -> bytes | memoryview:
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
