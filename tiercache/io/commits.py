"""The COMMIT frame that closes a batch: the batch's directory and its commit trailer.

Layout of a COMMIT frame starting at offset ``P`` (it ends at an alignment boundary, so the next
batch starts aligned)::

    frame header            kind COMMIT, seq and batch = the batch's sequence number, body
                            length = number of frames, body crc field = bytes of the directory
    zero padding            at least ``MIN_GAP`` bytes
    directory               one ``ENTRY`` per frame of the batch, in order, then their keys
    trailer                 ``TRAILER``: magic ``b"TCSE"``, frame count, batch, directory
                            length, salt, crc32; the last bytes of the batch

Every directory entry repeats one frame's header (kind, offset, length, seq, body length, body
crc32, key) under its own crc32, so a frame whose header is damaged is still known: a DELETE is
still applied, a PUT still shadows older versions of its key and is reported as damaged instead
of silently disappearing. The padding keeps each frame's header and its directory entry at least
``MIN_GAP`` bytes apart (the last frame before the COMMIT frame is the nearest), so one damaged
run shorter than that never destroys both copies; the frame header and the trailer, which both
locate the directory, are as far apart.

The trailer is the commit mark: a writer killed mid-batch leaves no valid trailer (its file ends
before it). A scan accepts a batch whose trailer was damaged later only when everything else in
it checks out (``tiercache.io.scan``).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import NamedTuple

from ..errors import CorruptBlockError
from .frames import HEADER_SIZE, FrameKind, pack_header, round_up

#: kind, key length, body crc32, offset, frame length, seq, body length, key offset, crc32.
ENTRY = struct.Struct("<BxHIQQQQII")
_ENTRY_HEAD = struct.Struct(ENTRY.format[:-1])  # all but the crc32
_ENTRY_CRC = _ENTRY_HEAD.size
#: magic, frame count, batch, directory bytes, salt, crc32.
TRAILER = struct.Struct("<4sIQQII")
TRAILER_MAGIC = b"TCSE"
#: Least distance in bytes between a frame's header and its directory entry.
MIN_GAP = 1024


class DirEntry(NamedTuple):
    """One frame of a batch as its COMMIT frame's directory records it (a tuple: a batch
    makes one per frame)."""

    kind: FrameKind
    key: bytes
    offset: int
    frame_len: int
    seq: int
    body_len: int
    body_crc: int


@dataclass(frozen=True, slots=True)
class Trailer:
    """A batch's commit trailer; ``end`` is the offset just past it (the end of the batch)."""

    count: int
    batch: int
    dir_len: int
    end: int


def directory_length(count: int, key_bytes: int) -> int:
    """Bytes of the directory of ``count`` frames whose keys take ``key_bytes`` in all."""
    return count * ENTRY.size + key_bytes


def commit_length(pos: int, dir_len: int, align: int) -> int:
    """Bytes of the COMMIT frame written at offset ``pos`` with a directory of ``dir_len`` bytes."""
    return round_up(pos + HEADER_SIZE + MIN_GAP + dir_len + TRAILER.size, align) - pos


def pack_commit(pos: int, batch: int, salt: int, entries: list[DirEntry], align: int) -> list[bytes]:
    """The COMMIT frame at offset ``pos`` closing a batch of ``entries``, as parts to write."""
    table, keys, key_offset = [], [], 0
    head, crc, pack = _ENTRY_HEAD.pack, zlib.crc32, struct.Struct("<I").pack
    for e in entries:
        fixed = head(e.kind, len(e.key), e.body_crc, e.offset, e.frame_len, e.seq, e.body_len, key_offset)
        table += (fixed, pack(crc(e.key, crc(fixed))))
        keys.append(e.key)
        key_offset += len(e.key)
    directory = b"".join(table + keys)
    length = commit_length(pos, len(directory), align)
    fixed = TRAILER.pack(TRAILER_MAGIC, len(entries), batch, len(directory), salt, 0)[:-4]
    trailer = fixed + struct.pack("<I", zlib.crc32(fixed))
    head = pack_header(FrameKind.COMMIT, batch, batch, salt, b"", len(entries), len(directory), length)
    return [head, bytes(length - len(head) - len(directory) - len(trailer)), directory, trailer]


def parse_trailer(data: bytes | memoryview, end: int, salt: int | None, where: str) -> Trailer:
    """The trailer in ``data`` (its ``TRAILER.size`` bytes), which ends at offset ``end``;
    ``CorruptBlockError`` if it is not a valid trailer (of this salt, when given)."""
    if len(data) < TRAILER.size:
        raise CorruptBlockError(f"{where}: truncated commit trailer")
    magic, count, batch, dir_len, tsalt, crc = TRAILER.unpack_from(data)
    if magic != TRAILER_MAGIC or zlib.crc32(bytes(data[: TRAILER.size - 4])) != crc:
        raise CorruptBlockError(f"{where}: commit trailer damaged")
    if salt is not None and tsalt != salt:
        raise CorruptBlockError(f"{where}: commit trailer of another segment")
    if dir_len < count * ENTRY.size:
        raise CorruptBlockError(f"{where}: commit trailer lengths are inconsistent")
    return Trailer(count, batch, dir_len, end)


def parse_directory(data: bytes | memoryview, count: int) -> list[DirEntry | None]:
    """The ``count`` entries of directory ``data``; None for each entry that fails its crc32."""
    out: list[DirEntry | None] = []
    keys = ENTRY.size * count
    for i in range(count):
        kind, key_len, body_crc, offset, frame_len, seq, body_len, key_offset, crc = (
            ENTRY.unpack_from(data, i * ENTRY.size))
        fixed = bytes(data[i * ENTRY.size : i * ENTRY.size + _ENTRY_CRC])
        key = bytes(data[keys + key_offset : keys + key_offset + key_len])
        if len(key) != key_len or zlib.crc32(key, zlib.crc32(fixed)) != crc:
            out.append(None)
            continue
        try:
            out.append(DirEntry(FrameKind(kind), key, offset, frame_len, seq, body_len, body_crc))
        except ValueError:
            out.append(None)
    return out
