"""``DiskStore``: a crash-safe, persistent store of block records in large segment files.

- **Layout.** Records go into append-only segment files (``seg-NNNNNNNN.tcseg``, up to
  ``segment_bytes`` each) as frames (``tiercache.io.frames``); each write is a batch of frames
  closed by a COMMIT frame and, with ``sync=True``, one ``fdatasync``. A batch is all or nothing.
- **Index.** In memory: key -> (segment, offset, length, crc32, seq), for ``BlockKey``\\ s and for
  the parts of saved contexts (``ContextPart``). Checkpointed to ``manifest.json``
  (``tiercache.io.manifest``) and rebuilt by scanning segments past the checkpoint on open, so a
  writer killed at any point loses at most its uncommitted batch.
- **Reads.** Concurrent positioned reads on a thread pool (``O_DIRECT`` where the filesystem
  allows it); every record's crc32 is checked and a mismatch raises ``CorruptBlockError`` naming
  the segment file and offset. Nothing is ever returned unverified unless asked (``verify=False``,
  for callers that verify while decoding).
- **Capacity.** ``budget_bytes`` bounds the bytes of live frames. Saved contexts are a cache:
  when a write does not fit, the least recently used ones are evicted. Blocks are never evicted:
  a write that does not fit raises ``CapacityError`` and stores nothing. Overwritten and deleted
  records leave dead bytes that compaction reclaims (copying a segment's live records to the
  active segment, then removing it) whenever the files exceed the budget.
- **Processes.** One writer (an exclusive ``flock``) and any number of readers
  (``readonly=True``), which see what was committed when they opened or last called ``refresh``.

Everything on disk is binary structs or JSON; no pickle.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, NamedTuple, Sequence

from ..blocks import BlockKey
from ..errors import BlockNotFoundError, CapacityError, CorruptBlockError, StoreError, TiercacheError
from .checksum import crc32
from .frames import (
    HEADER_SIZE,
    ContextPart,
    FrameHeader,
    FrameKind,
    StoreKey,
    check_context_key,
    frame_length,
    key_from_json,
    key_to_bytes,
    pack_frame,
    parse_header,
)
from .lockfile import WriterLock
from .manifest import IndexEntry, Manifest, read_manifest, write_manifest
from .record import prefix_size, record_length
from .segments import ScratchBuffer, Segment, fsync_dir, segment_id, segment_name

#: Bytes read to parse a frame header and its key while scanning (keys are at most ~6 KiB).
_SCAN_READ = 8192
#: Bytes of records copied per compaction batch.
_COMPACT_BATCH = 64 << 20
#: Largest read that adjacent records are merged into, in bytes.
_COALESCE_BYTES = 2 << 20
#: Compaction only rewrites segments at least this dead, so a store kept full of live records
#: does not copy the same records over and over.
_COMPACT_MIN_DEAD = 0.25


@dataclass(frozen=True, slots=True)
class _Frame:
    """A frame to write: PUT (with its record) or DELETE; ``seq`` None means the batch's own."""

    kind: FrameKind
    key: StoreKey
    record: bytes | memoryview = b""
    seq: int | None = None


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
        #: Saved contexts evicted to make room, since open.
        self.evictions = 0
        #: Why the last periodic checkpoint, or automatic compaction, failed ("" if it did not).
        self.checkpoint_error = ""
        self.compaction_error = ""

        self._lock = threading.RLock()
        self._scratch = threading.local()  # each I/O thread's ScratchBuffer
        self._index: dict[StoreKey, IndexEntry] = {}
        self._by_seq: dict[int, set[BlockKey]] = {}
        self._contexts: dict[str, int] = {}  # name -> number of parts
        self._lru: OrderedDict[str, None] = OrderedDict()
        self._segments: dict[int, Segment] = {}
        self._committed: dict[int, int] = {}  # segment id -> bytes committed
        self._live: dict[int, int] = {}  # segment id -> bytes of live PUT frames
        self._seq = 0
        self._next_segment = 1  # segment ids are never reused: readers may hold removed ones open
        self._active: Segment | None = None
        self._batches_since_checkpoint = 0
        self._writer_lock: WriterLock | None = None
        self._closed = False

        self._open_directory()
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="tiercache-disk")

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
        except BaseException:
            self._release()
            raise

    def _load(self) -> None:
        """Load the manifest and replay the committed batches written after it."""
        for _ in range(3):
            manifest, why = read_manifest(self.path)
            try:
                files = sorted((segment_id(p), p) for p in self.path.iterdir() if segment_id(p) is not None)
            except OSError as exc:
                raise StoreError(f"cannot list disk store directory {self.path}: {exc.strerror}") from exc
            # A writer removes a segment only after writing a manifest without it; a reader that
            # raced that removal reads the manifest again.
            if not (self.readonly and manifest and not set(manifest.segments) <= {s for s, _ in files}):
                break
        manifest = manifest or Manifest()
        self.recovery_note = why
        self._seq = manifest.seq
        self._next_segment = max([manifest.next_segment] + [s + 1 for s, _ in files])
        for seg_id, path in files:
            if seg_id < manifest.next_segment and seg_id not in manifest.segments:
                # Compacted before the checkpoint; the writer died before unlinking it. Its dead
                # records must not be replayed.
                if not self.readonly:
                    path.unlink()
                continue
            try:
                self._segments[seg_id] = Segment(path, seg_id, self.align, self.direct)
            except StoreError:
                if self.readonly:  # removed by the writer's compaction meanwhile
                    continue
                raise
            self._committed[seg_id] = 0
            self._live[seg_id] = 0
        for key, entry in manifest.entries.items():
            self._apply_put(key, entry)
        for seg_id, seg in self._segments.items():
            start = manifest.segments.get(seg_id, 0)
            if start > seg.size():
                self.recovery_note += f"; {seg.path} is shorter ({seg.size()} bytes) than committed ({start})"
                self._committed[seg_id] = start
                continue
            end = self._scan(seg, start)
            self._committed[seg_id] = end
            if start < end and not self.recovery_note:
                self.recovery_note = f"replayed batches written after the manifest in {seg.path}"
        for name in manifest.contexts_lru:
            if name in self._contexts:
                self._lru[name] = None
        for name in self._contexts:  # contexts found only by scanning are the newest
            self._lru.setdefault(name, None)

    def _scan(self, seg: Segment, pos: int) -> int:
        """Replay the committed batches of ``seg`` from ``pos``; return the end of the last one.

        Scanning stops at the first frame that is torn, fails its checksum or belongs to a batch
        without a COMMIT frame: that is the tail a killed writer left, and it is not committed.
        """
        size = seg.size()
        committed = pos
        batch: list[tuple[FrameHeader, StoreKey, int]] = []
        while pos + HEADER_SIZE <= size:
            try:
                header, key_bytes = parse_header(seg.read(pos, min(_SCAN_READ, size - pos)),
                                                 f"segment {seg.path} offset {pos}")
                if pos + header.frame_len > size:
                    break
                if header.kind == FrameKind.COMMIT:
                    if header.body_len != len(batch):
                        break
                    for h, key, offset in batch:
                        self._replay(seg.id, offset, h, key)
                    self._seq = max(self._seq, header.seq)
                    batch = []
                    committed = pos + header.frame_len
                else:
                    key = key_from_json(json.loads(key_bytes))
                    if header.kind == FrameKind.PUT:
                        self._read_record(seg, pos, header.key_len, header.body_len, header.body_crc)
                    batch.append((header, key, pos))
            except (TiercacheError, ValueError):
                break
            pos += header.frame_len
        return committed

    def _replay(self, seg_id: int, offset: int, h: FrameHeader, key: StoreKey) -> None:
        current = self._index.get(key)
        if h.kind == FrameKind.PUT:
            entry = IndexEntry(seg_id, offset, h.frame_len, h.key_len, h.body_len, h.body_crc, h.seq)
            if current is None or entry.newer_than(current):
                self._apply_put(key, entry)
        else:
            self._delete_older(key, h.seq)

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
                self._lru.pop(key.context, None)

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
                    raise CorruptBlockError(f"{where}: frame holds {key_bytes!r}, expected the record of {key}")
                record = frame[header.body_offset : header.body_offset + entry.record_len]
                if verify:
                    _check_crc(record, entry.crc, where)
                future.set_result(then(key, record, where) if then is not None else record)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
                future.set_exception(exc)

    def _read_record(self, seg: Segment, offset: int, key_len: int, record_len: int, crc: int) -> memoryview:
        """Read and verify the record of the PUT frame at ``offset`` (used while scanning)."""
        data = seg.read(offset, HEADER_SIZE + key_len + record_len)
        record = data[HEADER_SIZE + key_len :]
        _check_crc(record, crc, f"segment {seg.path} offset {offset}")
        return record

    # ------------------------------------------------------------------ writes

    def put_many(self, items: Sequence[tuple[StoreKey, bytes | memoryview]]) -> list[int]:
        """Store records (each a whole ``tiercache.io.record`` record) under their keys, as one
        atomic batch; return the bytes each takes on disk. Replaces existing records of the same
        keys. Evicts least recently used saved contexts if needed; ``CapacityError`` (nothing
        stored) if the blocks still do not fit."""
        frames = [_Frame(FrameKind.PUT, key, _checked_record(key, rec)) for key, rec in items]
        with self._lock:
            self._make_room(frames, protect=set())
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
        atomically replacing any context of that name; return the bytes it takes. Evicts older
        contexts if needed; ``CapacityError`` if it cannot fit even then."""
        check_context_key(name)
        if not records:
            raise StoreError(f"context {name!r}: nothing to save")
        frames = [_Frame(FrameKind.PUT, ContextPart(name, i), _checked_record(name, r))
                  for i, r in enumerate(records)]
        with self._lock:
            old = self._contexts.get(name, 0)
            # Parts past the new length go in the same batch, so the replacement is atomic.
            frames += [_Frame(FrameKind.DELETE, ContextPart(name, i)) for i in range(len(records), old)]
            self._make_room(frames, protect={name})
            entries = self._commit(frames)
            self._lru[name] = None
            self._lru.move_to_end(name)
            self._maybe_compact()
        return sum(e.frame_len for e in entries)

    def load_context(self, name: str, verify: bool = True,
                     then: Callable[[StoreKey, memoryview, str], Any] | None = None) -> list[Any]:
        """The records of context ``name``, in order, read concurrently (``verify`` and ``then``
        as in ``read_async``); ``BlockNotFoundError`` if there is no such context. Marks it
        recently used."""
        with self._lock:
            count = self._contexts.get(name)
            if count is None:
                raise BlockNotFoundError(f"disk store {self.path} holds no context {name!r}")
            if not self.readonly:
                self._lru.move_to_end(name)
            futures = self.read_async([ContextPart(name, i) for i in range(count)], verify, then)
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
        """Names of the saved contexts, least recently used first."""
        with self._lock:
            return list(self._lru)

    def has_context(self, name: str) -> bool:
        return name in self._contexts

    def _make_room(self, frames: list[_Frame], protect: set[str]) -> None:
        """Evict least recently used contexts (not in ``protect``) until ``frames`` fit in the
        budget; ``CapacityError`` if they cannot."""
        self._check_writable()
        need = 0
        for f in frames:
            if f.kind != FrameKind.PUT:
                continue
            need += self.frame_bytes(f.key, len(f.record))
            old = self._index.get(f.key)
            need -= old.frame_len if old is not None else 0
        victims = (name for name in list(self._lru) if name not in protect)
        while self.used_bytes + need > self.budget_bytes:
            victim = next(victims, None)
            if victim is None:
                raise CapacityError(
                    f"disk store {self.path}: {need} more bytes do not fit; {self.used_bytes} of "
                    f"{self.budget_bytes} bytes hold live blocks and contexts that cannot be evicted"
                )
            self.delete_context(victim)
            self.evictions += 1

    def _commit(self, frames: list[_Frame], sync: bool = True) -> list[IndexEntry]:
        """Append ``frames`` and a COMMIT frame as one batch, make it durable, then apply it to the
        index. Returns the PUT frames' entries. On a write error nothing is applied, the partial
        batch is cut off and later batches go to a fresh segment."""
        self._check_writable()
        if not frames:
            return []
        seq = self._seq + 1
        frames = sorted(frames, key=lambda f: f.kind)  # PUTs first, so every PUT starts aligned
        encoded = [(f, key_to_bytes(f.key)) for f in frames]
        total = sum(frame_length(f.kind, len(k), len(f.record), self.align) for f, k in encoded)
        total += frame_length(FrameKind.COMMIT, 0, 0, self.align)
        seg = self._active_segment(total)
        start = pos = self._committed[seg.id]
        parts: list[bytes | memoryview] = []
        applied: list[tuple[_Frame, IndexEntry | None]] = []
        for f, key_bytes in encoded:
            fseq = f.seq if f.seq is not None else seq
            length = frame_length(f.kind, len(key_bytes), len(f.record), self.align)
            crc = _record_crc(f.record) if f.kind == FrameKind.PUT else 0
            parts += pack_frame(f.kind, fseq, key_bytes, f.record, len(f.record), crc, length)
            entry = (IndexEntry(seg.id, pos, length, len(key_bytes), len(f.record), crc, fseq)
                     if f.kind == FrameKind.PUT else None)
            applied.append((f, entry))
            pos += length
        commit_len = frame_length(FrameKind.COMMIT, 0, 0, self.align)
        parts += pack_frame(FrameKind.COMMIT, seq, b"", b"", len(frames), 0, commit_len)
        pos += commit_len
        try:
            seg.append(parts, start)
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
        self._seq = seq
        for f, entry in applied:
            if entry is not None:
                self._apply_put(f.key, entry)
            else:
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
        """The segment to append a batch of ``batch_bytes`` to, starting a new one when the
        active one would outgrow ``segment_bytes`` (a batch never spans segments)."""
        seg = self._active
        if seg is not None and (self._committed[seg.id] == 0
                                or self._committed[seg.id] + batch_bytes <= self.segment_bytes):
            return seg
        seg_id = self._next_segment
        self._next_segment += 1
        seg = Segment(self.segment_path(seg_id), seg_id, self.align, self.direct, writable=True)
        fsync_dir(self.path)  # the new file's directory entry must survive a crash too
        self._segments[seg_id] = seg
        self._committed[seg_id] = 0
        self._live[seg_id] = 0
        self._active = seg
        return seg

    def _abandon_active(self, seg: Segment, committed: int) -> None:
        # Cut the torn batch off so no scan can ever mistake it for data, and never append to a
        # file that failed a write or a sync again (after a failed fsync the kernel may have
        # dropped dirty pages).
        try:
            seg.truncate(committed)
        except OSError:
            pass
        self._active = None

    # ------------------------------------------------------------------ compaction

    def compact(self, target_bytes: int | None = None) -> int:
        """Reclaim dead space until the segment files take at most ``target_bytes`` (default: the
        budget), emptiest segments first; return the bytes reclaimed."""
        with self._lock:
            self._check_writable()
            target = self.budget_bytes if target_bytes is None else target_bytes
            before = self.disk_bytes
            candidates = sorted(
                (s for s in self._segments.values()
                 if s is not self._active and s.size() - self._live[s.id] >= _COMPACT_MIN_DEAD * s.size()),
                key=lambda s: self._live[s.id] / max(1, s.size()),
            )
            for seg in candidates:
                if self.disk_bytes <= target:
                    break
                self._compact_segment(seg)
            return before - self.disk_bytes

    def _compact_segment(self, seg: Segment) -> None:
        older_exists = any(s < seg.id for s in self._segments)
        batch: list[_Frame] = []
        batch_bytes = 0
        pos, end = 0, self._committed[seg.id]
        while pos < end:
            header, key_bytes = parse_header(seg.read(pos, min(_SCAN_READ, end - pos)),
                                             f"segment {seg.path} offset {pos}")
            if header.kind != FrameKind.COMMIT:
                key = key_from_json(json.loads(key_bytes))
                entry = self._index.get(key)
                live = entry is not None and (entry.segment, entry.offset) == (seg.id, pos)
                if header.kind == FrameKind.PUT and live:
                    record = self._read_record(seg, pos, header.key_len, header.body_len, header.body_crc)
                    batch.append(_Frame(FrameKind.PUT, key, bytes(record), header.seq))
                    batch_bytes += header.frame_len
                elif header.kind == FrameKind.DELETE and older_exists:
                    # It may still hide an older record of its key in an older segment.
                    batch.append(_Frame(FrameKind.DELETE, key, seq=header.seq))
            if batch_bytes >= _COMPACT_BATCH:
                self._commit(batch)
                batch, batch_bytes = [], 0
            pos += header.frame_len
        if batch:
            self._commit(batch)
        # The manifest must stop naming the segment before the file goes.
        self._forget_segment(seg.id)
        self.checkpoint()
        seg.retire()
        try:
            os.unlink(seg.path)
            fsync_dir(self.path)
        except OSError as exc:  # harmless: the next open removes a segment the manifest dropped
            raise StoreError(f"compaction could not remove {seg.path}: {exc.strerror}") from exc

    def _forget_segment(self, seg_id: int) -> None:
        del self._segments[seg_id]
        del self._committed[seg_id]
        del self._live[seg_id]

    # ------------------------------------------------------------------ lifecycle

    def checkpoint(self) -> None:
        """Write the manifest now (atomically)."""
        with self._lock:
            self._check_writable()
            write_manifest(self.path, Manifest(self._seq, self._next_segment, dict(self._committed),
                                               dict(self._index), list(self._lru)))
            self._batches_since_checkpoint = 0
            self.checkpoint_error = ""

    def refresh(self) -> None:
        """Reader: pick up batches committed since open (or the last refresh)."""
        with self._lock:
            self._check_open()
            for path in sorted(self.path.iterdir()):
                seg_id = segment_id(path)
                # Only segments started since: an older unknown one was compacted away.
                if seg_id is not None and seg_id >= self._next_segment:
                    try:
                        self._segments[seg_id] = Segment(path, seg_id, self.align, self.direct)
                    except StoreError:
                        continue
                    self._next_segment = seg_id + 1
                    self._committed[seg_id] = 0
                    self._live.setdefault(seg_id, 0)
            for seg_id, seg in sorted(self._segments.items()):
                self._committed[seg_id] = self._scan(seg, self._committed[seg_id])
            for name in self._contexts:
                self._lru.setdefault(name, None)

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


def _record_crc(record: bytes | memoryview) -> int:
    return struct.unpack_from("<I", record, len(record) - 4)[0]


def _check_crc(record: memoryview, crc: int, where: str) -> None:
    if len(record) < 4 or crc32(record[:-4]) != crc or _record_crc(record) != crc:
        raise CorruptBlockError(f"{where}: record checksum mismatch")


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
