"""``DiskStore``: a crash-safe, persistent store of block records in large segment files.

- **Layout.** Records go into append-only segment files (``seg-NNNNNNNN.tcseg``, up to
  ``segment_bytes`` each) as frames (``tiercache.io.frames``); each write is a batch of frames
  closed by a COMMIT frame holding the batch's directory (``tiercache.io.commits``) and, with
  ``sync=True``, one ``fdatasync``. A batch is all or nothing (``tiercache.io.writes``).
- **Index.** In memory (``tiercache.io.index``): key -> (segment, offset, length, crc32, seq), for
  ``BlockKey``\\ s and for the parts of saved contexts (``ContextPart``). Checkpointed to a
  checksummed ``manifest.json`` (``tiercache.io.manifest``) that is checked against the segments
  before it is used, and rebuilt by scanning segments past the checkpoint on open
  (``tiercache.io.recovery``), so a writer killed at any point loses at most its uncommitted batch.
- **Damage.** Scans find frames again after damaged bytes (``tiercache.io.scan``): every intact
  committed record after the damage is kept, a damaged one is listed in ``damage`` and raises
  ``CorruptBlockError`` naming the file and offset when read, and a newer version is never
  shadowed by an older one. Where damage makes frames unknowable, reads they could affect are
  refused rather than served possibly stale.
- **Reads.** Concurrent positioned reads on a thread pool (``O_DIRECT`` where the filesystem
  allows it; ``tiercache.io.reads``); every record's crc32 is checked and a mismatch raises
  ``CorruptBlockError`` naming the segment file and offset. Nothing is ever returned unverified
  unless asked (``verify=False``, for callers that verify while decoding). A saved context is
  read as one version or not at all.
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

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

from ..blocks import BlockKey
from ..errors import BlockNotFoundError, CorruptBlockError, StoreError
from .frames import ContextPart, FrameKind, StoreKey, check_context_key
from .index import StoreIndex
from .lockfile import WriterLock
from .manifest import IndexEntry
from .reads import RecordReads
from .recovery import Recovery, Vanished
from .segments import segment_name
from .writes import StoreWriter, WriteFrame, checked_record


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
        #: Times ``refresh`` loaded the index afresh (a segment came and went in between).
        self.reloads = 0

        self._lock = threading.RLock()
        self._index = StoreIndex(self.path, align, self.direct)
        self._recovery = Recovery(self._index, readonly)
        self._writer = StoreWriter(self._index, budget_bytes=budget_bytes, segment_bytes=segment_bytes,
                                   sync=sync, checkpoint_every=checkpoint_every)
        self._writer_lock: WriterLock | None = None
        self._closed = False

        self._open_directory()
        self._reads = RecordReads(self._index, io_threads)

    # ------------------------------------------------------------------ what recovery and writes found

    @property
    def recovery_note(self) -> str:
        """Why the index was rebuilt from the segments on open ("" if the manifest was current)."""
        return self._recovery.recovery_note

    @property
    def damage(self) -> list[str]:
        """Damaged frames and regions found (each naming its segment file and offset), since open."""
        return self._recovery.damage

    @property
    def checkpoint_error(self) -> str:
        """Why the last periodic checkpoint failed ("" if it did not)."""
        return self._writer.checkpoint_error

    @property
    def compaction_error(self) -> str:
        """Why the last automatic compaction failed, or what it left as it is ("" if nothing)."""
        return self._writer.compaction_error

    # ------------------------------------------------------------------ opening

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
            self._recovery.load()
            if not self.readonly:
                for problem in self._writer.clean_up():
                    self._recovery.note(problem)
        except BaseException:
            self._release()
            raise

    # ------------------------------------------------------------------ sizes

    @property
    def capacity_bytes(self) -> int:
        """Bytes of live frames the store may hold (``budget_bytes``)."""
        return self.budget_bytes

    @property
    def used_bytes(self) -> int:
        """Bytes of live frames (records plus frame headers and alignment padding)."""
        with self._lock:
            return self._index.used_bytes()

    @property
    def disk_bytes(self) -> int:
        """Bytes of all segment files, dead frames awaiting compaction included."""
        with self._lock:
            return self._index.disk_bytes()

    def frame_bytes(self, key: StoreKey, record_len: int) -> int:
        """Bytes a record of ``record_len`` bytes under ``key`` takes in the store."""
        return self._writer.frame_bytes(key, record_len)

    def __len__(self) -> int:
        return len(self._index.entries)

    def __contains__(self, key: object) -> bool:
        return key in self._index.entries

    def keys(self) -> list[StoreKey]:
        with self._lock:
            return list(self._index.entries)

    def entry(self, key: StoreKey) -> IndexEntry:
        """Where ``key``'s record lives; ``BlockNotFoundError`` if absent."""
        return self._index.entry(key)

    @property
    def executor(self) -> ThreadPoolExecutor:
        """The store's I/O threads, for work that belongs next to the I/O: encoding records
        before a write, decoding them after a read (both release the GIL in torch and zlib)."""
        return self._reads.executor

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
            jobs, futures = self._reads.plan(keys)
        self._reads.submit(jobs, verify, then)
        return futures

    def get_many(self, keys: Sequence[StoreKey], verify: bool = True) -> list[memoryview]:
        """The records of ``keys``, read concurrently (see ``read_async``)."""
        futures = self.read_async(keys, verify)
        return [f.result() for f in futures]

    def get(self, key: StoreKey, verify: bool = True) -> memoryview:
        return self.get_many([key], verify)[0]

    # ------------------------------------------------------------------ writes

    def put_many(self, items: Sequence[tuple[StoreKey, bytes | memoryview]]) -> list[int]:
        """Store records (each a whole ``tiercache.io.record`` record) under their keys, as one
        atomic batch; return the bytes each takes on disk. Replaces existing records of the same
        keys. ``CapacityError`` (nothing stored) if they do not fit in the budget."""
        frames = [WriteFrame(FrameKind.PUT, key, checked_record(key, rec)) for key, rec in items]
        with self._lock:
            entries = self._write(frames)
        return [e.frame_len for e in entries]

    def delete(self, keys: Iterable[StoreKey], sync: bool = True) -> None:
        """Remove ``keys`` (one batch); ``BlockNotFoundError`` (nothing removed) if one is absent.
        ``sync=False`` skips the fsync: a crash may then bring the records back (never damage
        them), which is fine for blocks a later open discards anyway."""
        keys = list(keys)
        with self._lock:
            for key in keys:
                self.entry(key)
            self._write([WriteFrame(FrameKind.DELETE, key) for key in keys], sync, room=False)

    def delete_seq(self, seq: int) -> int:
        """Remove every block of sequence ``seq``; return how many there were."""
        with self._lock:
            keys = sorted(self._index.by_seq.get(seq, ()))
            if keys:
                self.delete(keys)
            return len(keys)

    def block_keys(self, seq: int | None = None) -> list[BlockKey]:
        """The stored ``BlockKey``\\ s, of sequence ``seq`` only if given."""
        with self._lock:
            if seq is not None:
                return sorted(self._index.by_seq.get(seq, ()))
            return sorted(k for keys in self._index.by_seq.values() for k in keys)

    # ------------------------------------------------------------------ saved contexts

    def save_context(self, name: str, records: Sequence[bytes | memoryview]) -> int:
        """Store a context as the ordered ``records`` under ``name`` (e.g. a ``content_key``),
        atomically replacing any context of that name; return the bytes it takes.
        ``CapacityError`` (nothing stored) if it does not fit in the budget."""
        check_context_key(name)
        if not records:
            raise StoreError(f"context {name!r}: nothing to save")
        frames = [WriteFrame(FrameKind.PUT, ContextPart(name, i), checked_record(name, r))
                  for i, r in enumerate(records)]
        with self._lock:
            old = self._index.contexts.get(name, 0)
            # Parts past the new length go in the same batch, so the replacement is atomic.
            frames += [WriteFrame(FrameKind.DELETE, ContextPart(name, i)) for i in range(len(records), old)]
            entries = self._write(frames)
        return sum(e.frame_len for e in entries)

    def load_context(self, name: str, verify: bool = True,
                     then: Callable[[StoreKey, memoryview, str], Any] | None = None) -> list[Any]:
        """The records of context ``name``, in order, read concurrently (``verify`` and ``then``
        as in ``read_async``); ``BlockNotFoundError`` if there is no such context,
        ``CorruptBlockError`` if its parts are not those of one save."""
        with self._lock:
            count = self._index.contexts.get(name)
            if count is None:
                if self._index.unresolved:  # the unknowable frames may have held it
                    self._index.check_unresolved(ContextPart(name, 0))
                raise BlockNotFoundError(f"disk store {self.path} holds no context {name!r}")
            parts = [ContextPart(name, i) for i in range(count)]
            entries = [self._index.entries.get(p) for p in parts]
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
            count = self._index.contexts.get(name)
            if count is None:
                raise BlockNotFoundError(f"disk store {self.path} holds no context {name!r}")
            parts = [WriteFrame(FrameKind.DELETE, ContextPart(name, i)) for i in range(count)]
            self._write(parts, room=False)

    def contexts(self) -> list[str]:
        """Names of the saved contexts, least recently saved first."""
        with self._lock:
            return sorted(self._index.contexts, key=self._index.saved_seq)

    def has_context(self, name: str) -> bool:
        return name in self._index.contexts

    def _write(self, frames: list[WriteFrame], sync: bool = True, *, room: bool = True) -> list[IndexEntry]:
        """Commit ``frames`` as one batch (``room``: ``CapacityError`` first if its records do not
        fit), then compact if the files outgrew the budget. Returns the PUT frames' entries."""
        self._check_writable()
        if room:
            self._writer.check_room(frames)
        entries = self._writer.commit(frames, sync)
        self._writer.maybe_compact()
        return entries

    # ------------------------------------------------------------------ compaction and lifecycle

    def compact(self, target_bytes: int | None = None) -> int:
        """Reclaim dead space until the segment files take at most ``target_bytes`` (default: the
        budget), emptiest segments first; return the bytes reclaimed. Segments holding damaged
        live records are left as they are (see ``compaction_error``)."""
        with self._lock:
            self._check_writable()
            return self._writer.compact(target_bytes)

    def checkpoint(self) -> None:
        """Write the manifest now (atomically)."""
        with self._lock:
            self._check_writable()
            self._writer.checkpoint()

    def refresh(self) -> None:
        """Reader: pick up batches committed since open (or the last refresh). If the writer
        started and compacted away a segment in between, the index is loaded afresh (its
        tombstones may be gone with it); either way the reader sees one committed state."""
        with self._lock:
            self._check_open()
            try:
                self._recovery.refresh()
            except Vanished:
                self._reload()

    def _reload(self) -> None:
        self.reloads += 1
        old = list(self._index.segments.values())
        self._index.reset()
        self._recovery = Recovery(self._index, self.readonly)
        try:
            self._recovery.load()
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
                self._reads.executor.shutdown(wait=True)
                self._release()

    def _release(self) -> None:
        for seg in self._index.segments.values():
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
