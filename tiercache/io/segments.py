"""Segment files: large append-only files of frames after a segment header, and the positioned
I/O on them.

Reads go through ``O_DIRECT`` where the filesystem allows it, so the store reads from the drive
at its own pace instead of through (and evicting) the page cache; where it does not (tmpfs,
some network filesystems), the segment falls back to ordinary buffered reads. The fallback is
detected, never fatal.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import threading
from pathlib import Path

from ..errors import CorruptBlockError, StoreError
from .frames import SEGMENT_HEADER_SIZE, pack_segment_header, parse_segment_header

SEGMENT_SUFFIX = ".tcseg"
#: Bytes joined into one write call; bounds the memory a large batch takes while being written.
_WRITE_CHUNK = 16 << 20


def segment_name(seg_id: int) -> str:
    return f"seg-{seg_id:08d}{SEGMENT_SUFFIX}"


def segment_id(path: Path) -> int | None:
    """The id in a segment file's name, or None if ``path`` is not named like a segment."""
    name = path.name
    if not (name.startswith("seg-") and name.endswith(SEGMENT_SUFFIX)):
        return None
    digits = name[4 : -len(SEGMENT_SUFFIX)]
    return int(digits) if digits.isdigit() else None


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a created, renamed or removed file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Segment:
    """One segment file, open for positioned reads (and appends, for the writer's active segment).

    Readers hold a reference (``acquire``/``release``) while reading, so a segment that
    compaction retires is closed only once no read is using its descriptors.
    """

    def __init__(self, path: Path, seg_id: int, align: int, direct: bool,
                 create_salt: int | None = None) -> None:
        """Open segment file ``path`` for reading, or with ``create_salt`` create it (empty: its
        header goes out with its first batch) as the writer's active segment. ``StoreError`` if
        it cannot be opened or is not a regular file; ``FileNotFoundError`` if it does not exist
        (compaction removed it)."""
        self.path = path
        self.id = seg_id
        self.align = align
        #: The segment's salt (None while unknown: a damaged header) and first batch's offset.
        self.salt: int | None = create_salt
        self.data_start = align
        #: Why the segment header could not be read ("" if it could).
        self.header_damage = ""
        self._stale_fds: list[int] = []
        self._refs = 0
        self._retired = False
        self._lock = threading.Lock()
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL if create_salt is not None else os.O_RDONLY
        try:
            self.fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o644)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise StoreError(f"cannot open segment {path}: {exc.strerror}") from exc
        self.direct_fd = None
        try:
            if not stat.S_ISREG(os.fstat(self.fd).st_mode):
                raise StoreError(f"{path} is named like a segment file but is not a regular file; "
                                 "move it out of the store directory")
            if create_salt is None:
                self.read_header()
            self.direct_fd = _open_direct(path) if direct else None
        except OSError as exc:
            self._close()
            if create_salt is not None:
                path.unlink(missing_ok=True)
            raise StoreError(f"cannot {'create' if create_salt is not None else 'read'} segment {path}: "
                             f"{exc.strerror}") from exc
        except BaseException:
            self._close()
            raise

    def header(self) -> bytes:
        """The segment header the writer puts in front of the segment's first batch."""
        return pack_segment_header(self.id, self.salt, self.align)

    def read_header(self) -> None:
        """Learn the salt and first batch's offset from the segment header (``header_damage``
        says why not, if it is unreadable)."""
        data = os.pread(self.fd, SEGMENT_HEADER_SIZE + 4096, 0)
        try:
            header = parse_segment_header(data, self.path)
        except CorruptBlockError as exc:
            self.header_damage = str(exc)
            return
        if header.seg_id != self.id:
            raise StoreError(f"{self.path} holds segment {header.seg_id} (a renamed or copied file); "
                             "segment files must keep their names")
        self.salt = header.salt
        self.data_start = header.data_start
        self.header_damage = ""

    @property
    def direct(self) -> bool:
        return self.direct_fd is not None

    def size(self) -> int:
        """Current length of the file in bytes."""
        return os.fstat(self.fd).st_size

    def acquire(self) -> None:
        with self._lock:
            if self._retired:
                raise StoreError(f"segment {self.path} was removed by compaction")
            self._refs += 1

    def release(self) -> None:
        with self._lock:
            self._refs -= 1
            close = self._retired and self._refs == 0
        if close:
            self._close()

    def retire(self) -> None:
        """Close the descriptors once no read holds the segment."""
        with self._lock:
            self._retired = True
            close = self._refs == 0
        if close:
            self._close()

    def _close(self) -> None:
        for fd in [self.fd, self.direct_fd, *self._stale_fds]:
            if fd is not None and fd >= 0:
                os.close(fd)
        self.fd = -1
        self.direct_fd = None
        self._stale_fds = []

    def read(self, offset: int, length: int, scratch: "ScratchBuffer | None" = None) -> memoryview:
        """Read ``length`` bytes at ``offset`` (both in bytes); ``CorruptBlockError`` naming the
        file and offset if the file ends first. Direct reads need an ``align``-aligned offset.

        With ``scratch`` the bytes land in that reusable buffer (valid until its next use);
        without, in a fresh one."""
        fd = self.direct_fd
        if fd is not None and offset % self.align == 0:
            try:
                return self._read_into(fd, offset, length, scratch, direct=True)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # The filesystem wants a coarser alignment than ours: read buffered from now on.
                # (Left open, not closed: another thread may be reading through it right now.)
                with self._lock:
                    if self.direct_fd == fd:
                        self.direct_fd = None
                        self._stale_fds.append(fd)
        return self._read_into(self.fd, offset, length, scratch, direct=False)

    def _read_into(self, fd: int, offset: int, length: int, scratch: "ScratchBuffer | None",
                   direct: bool) -> memoryview:
        span = -(-length // self.align) * self.align if direct else length
        view = scratch.get(span) if scratch is not None else memoryview(mmap.mmap(-1, max(span, 1)))
        done = 0
        while done < length:
            n = os.preadv(fd, [view[done:span]], offset + done)
            done += n
            # A short direct read means end of file (and the next offset would be unaligned).
            if n == 0 or (direct and done < length):
                raise CorruptBlockError(
                    f"segment {self.path} offset {offset}: truncated, the file ends at {offset + done} "
                    f"but the entry needs {length} bytes"
                )
        return view[:length]

    def append(self, parts: list[bytes | memoryview], offset: int) -> int:
        """Write ``parts`` back to back at ``offset``; return the end offset. ``OSError`` passes up."""
        chunk: list[bytes | memoryview] = []
        size = 0
        for part in parts:
            chunk.append(part)
            size += len(part)
            if size >= _WRITE_CHUNK:
                offset = self._write_all(b"".join(chunk), offset)
                chunk, size = [], 0
        return self._write_all(b"".join(chunk), offset) if chunk else offset

    def _write_all(self, data: bytes, offset: int) -> int:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n
        return offset

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def truncate(self, length: int) -> None:
        os.ftruncate(self.fd, length)


class ScratchBuffer:
    """A reusable page-aligned read buffer (one per I/O thread). Reading into fresh memory costs
    a page fault per 4 KiB, which halves the throughput of large reads; reusing it does not."""

    def __init__(self) -> None:
        self._buf: mmap.mmap | None = None

    def get(self, nbytes: int) -> memoryview:
        """A view of at least ``nbytes`` bytes; invalidates views handed out before."""
        if self._buf is None or len(self._buf) < nbytes:
            # An anonymous mmap is page-aligned, as O_DIRECT requires of the buffer.
            self._buf = mmap.mmap(-1, max(nbytes, 1 << 20))
        return memoryview(self._buf)[:nbytes]


def _open_direct(path: Path) -> int | None:
    """An ``O_DIRECT`` read descriptor of ``path``, or None where the filesystem refuses it (or
    the file was removed since its buffered descriptor was opened: that one still reads it)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_RDONLY | flag | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOENT):
            return None
        raise StoreError(f"cannot open segment {path}: {exc.strerror}") from exc
