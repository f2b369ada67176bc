"""The frame: how the disk store lays entries out inside a segment file (format version 2).

A segment file starts with a segment header (``SEGMENT_HEADER``, padded to the store's
alignment): magic ``b"TCSG"``, format version, alignment, segment id and the segment's *salt*, a
random number every frame of the segment repeats. Then come frames, each starting with a fixed
binary header (little-endian)::

    magic  b"TCSF"        4 bytes
    kind                  u8   PUT, DELETE, RETIRE or COMMIT
    (pad)                 1 byte
    key length K          u16  bytes of the UTF-8 JSON key that follows the header
    frame length          u64  bytes from this header to the next frame, padding included
    seq                   u64  sequence number of the write that created the entry (compaction
                               copies keep it)
    batch                 u64  sequence number of the batch the frame was written in
    body length B         u64  PUT: record bytes; RETIRE: the retired segment's id;
                               COMMIT: number of frames in the batch
    body crc32            u32  PUT: the record's own crc32 (its last 4 bytes); COMMIT: bytes of
                               the batch directory; else 0
    salt                  u32  the segment's salt
    header crc32          u32  over the 48 bytes above plus the key

then the key, then the body (a ``tiercache.io.record`` record for PUT), then zero padding.
Writes are batches of PUT/DELETE/RETIRE frames closed by one COMMIT frame, which also holds a
second copy of every frame's header (``tiercache.io.commits``): a batch without its COMMIT frame
(a writer killed mid-write) is not part of the store.

The sync marker (magic and salt), the lengths and the header checksum let a scan find frames
again after damaged bytes (``tiercache.io.scan``): a candidate must carry the segment's salt, so
record payloads, whatever bytes they hold, never pass for frames.

PUT frames are padded to the store's alignment (4 KiB by default) and a batch writes its PUT
frames first and ends aligned, so every PUT frame starts aligned and its record can be read with
``O_DIRECT``; DELETE and RETIRE frames are small and only 8-byte aligned.

Keys are JSON: a ``BlockKey`` is ``["b", seq, layer, index]``; part ``i`` of a saved context is
``["c", context_key, i]``. No pickle.
"""

from __future__ import annotations

import enum
import json
import struct
import zlib
from dataclasses import dataclass
from typing import Union

from ..blocks import BlockKey
from ..errors import CorruptBlockError, ShapeError, StoreError
from .checksum import crc32

#: The on-disk format of segments and manifests. 1: no segment header, salt or batch directory.
FORMAT_VERSION = 2
FRAME_MAGIC = b"TCSF"
SEGMENT_MAGIC = b"TCSG"
_HEADER = struct.Struct("<4sBxHQQQQIII")
HEADER_SIZE = _HEADER.size
_CRC_OFFSET = HEADER_SIZE - 4
#: magic, version, alignment, segment id, salt, crc32 of the fields before it.
_SEGMENT = struct.Struct("<4sHxxIQII")
SEGMENT_HEADER_SIZE = _SEGMENT.size
#: The format-1 frame header, recognised only to refuse old stores with a clear error.
_V1_HEADER = struct.Struct("<4sBxHQQQII")
#: Small frames (DELETE, RETIRE) are padded to this many bytes.
SMALL_ALIGN = 8
#: Longest context key accepted, in characters (keys are stored in every frame header).
MAX_CONTEXT_KEY = 1024


class FrameKind(enum.IntEnum):
    PUT = 1
    DELETE = 2
    COMMIT = 3
    #: Compaction copied a segment's live entries forward; the segment (id in the body length
    #: field) is dead and may be removed.
    RETIRE = 4


@dataclass(frozen=True, order=True, slots=True)
class ContextPart:
    """Record ``index`` (0-based) of the saved context named ``context``."""

    context: str
    index: int


StoreKey = Union[BlockKey, ContextPart]


def check_context_key(context: object) -> str:
    """Return ``context`` if it is a usable context key, else raise ``ShapeError``."""
    if not isinstance(context, str) or not context or len(context) > MAX_CONTEXT_KEY:
        raise ShapeError(f"a context key must be a non-empty str of at most {MAX_CONTEXT_KEY} characters, "
                         f"got {context!r:.80}")
    return context


def key_to_bytes(key: StoreKey) -> bytes:
    """The JSON encoding of a store key, as written in frame headers and the manifest."""
    return json.dumps(key_to_json(key), separators=(",", ":")).encode()


def key_to_json(key: StoreKey) -> list:
    if isinstance(key, BlockKey):
        return ["b", key.seq, key.layer, key.index]
    if isinstance(key, ContextPart):
        return ["c", key.context, key.index]
    raise ShapeError(f"store keys are BlockKey or ContextPart, got {type(key).__name__}")


def key_from_json(value: object) -> StoreKey:
    """Inverse of ``key_to_json``; ``CorruptBlockError`` if ``value`` (read from a frame or the
    manifest) is not a key."""
    if isinstance(value, list) and len(value) == 4 and value[0] == "b":
        try:
            return BlockKey(*value[1:])
        except ShapeError as exc:
            raise CorruptBlockError(f"not a store key: {exc}") from exc
    if (isinstance(value, list) and len(value) == 3 and value[0] == "c" and isinstance(value[1], str)
            and isinstance(value[2], int) and value[2] >= 0):
        return ContextPart(value[1], value[2])
    raise CorruptBlockError(f"not a store key: {value!r:.100}")


def key_from_bytes(data: bytes) -> StoreKey:
    """Inverse of ``key_to_bytes``; ``CorruptBlockError`` if ``data`` is not a key."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as exc:  # not UTF-8 JSON, or nested past the parser's depth
        raise CorruptBlockError(f"not a store key: {bytes(data)!r:.100}: {exc}") from None
    return key_from_json(value)


def round_up(n: int, align: int) -> int:
    return -(-n // align) * align


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """A parsed frame header."""

    kind: FrameKind
    key_len: int
    frame_len: int
    seq: int
    batch: int
    body_len: int
    body_crc: int
    salt: int

    @property
    def body_offset(self) -> int:
        """Offset of the body from the frame's start, in bytes."""
        return HEADER_SIZE + self.key_len


def pack_header(kind: FrameKind, seq: int, batch: int, salt: int, key: bytes, body_len: int, body_crc: int,
                frame_len: int) -> bytes:
    """A frame's header followed by its key."""
    fixed = _HEADER.pack(FRAME_MAGIC, kind, len(key), frame_len, seq, batch, body_len, body_crc, salt,
                         0)[:_CRC_OFFSET]
    return fixed + struct.pack("<I", zlib.crc32(key, zlib.crc32(fixed))) + key


def pack_frame(kind: FrameKind, seq: int, batch: int, salt: int, key: bytes, body: bytes | memoryview,
               body_len: int, body_crc: int, frame_len: int) -> list[bytes | memoryview]:
    """The bytes of one frame as parts to write in order (header+key, body, padding)."""
    head = pack_header(kind, seq, batch, salt, key, body_len, body_crc, frame_len)
    pad = frame_len - len(head) - len(body)
    return [head, body, bytes(pad)] if pad else [head, body]


def frame_length(kind: FrameKind, key_len: int, body_len: int, align: int) -> int:
    """Bytes a PUT, DELETE or RETIRE frame takes. PUT frames are padded to ``align``; a batch
    writes its PUT frames first, so every PUT starts aligned. (COMMIT: ``commits.commit_length``.)"""
    n = HEADER_SIZE + key_len + (body_len if kind == FrameKind.PUT else 0)
    return round_up(n, align if kind == FrameKind.PUT else SMALL_ALIGN)


def parse_header(data: bytes | memoryview, where: str, salt: int | None = None) -> tuple[FrameHeader, bytes]:
    """Parse and check a frame header followed by its key; return the header and raw key bytes.

    ``data`` must hold at least ``HEADER_SIZE`` bytes, and the key if the header is valid.
    ``CorruptBlockError`` (naming ``where``) if the magic, salt (when given), lengths or header
    checksum are wrong.
    """
    if len(data) < HEADER_SIZE:
        raise CorruptBlockError(f"{where}: truncated frame header ({len(data)} of {HEADER_SIZE} bytes)")
    magic, kind, key_len, frame_len, seq, batch, body_len, body_crc, fsalt, crc = _HEADER.unpack_from(data)
    if magic != FRAME_MAGIC:
        raise CorruptBlockError(f"{where}: bad frame magic {bytes(magic)!r}, expected {FRAME_MAGIC!r}")
    if len(data) < HEADER_SIZE + key_len:
        raise CorruptBlockError(f"{where}: truncated frame key")
    key = bytes(data[HEADER_SIZE : HEADER_SIZE + key_len])
    if zlib.crc32(key, zlib.crc32(data[:_CRC_OFFSET])) != crc:
        raise CorruptBlockError(f"{where}: frame header checksum mismatch")
    if salt is not None and fsalt != salt:
        raise CorruptBlockError(f"{where}: frame of another segment (salt {fsalt:#x}, expected {salt:#x})")
    try:
        kind = FrameKind(kind)
    except ValueError:
        raise CorruptBlockError(f"{where}: unknown frame kind {kind}") from None
    least = HEADER_SIZE + key_len + (body_len if kind == FrameKind.PUT else 0)
    if frame_len < least or frame_len % SMALL_ALIGN:
        raise CorruptBlockError(f"{where}: frame length {frame_len} does not fit its contents")
    return FrameHeader(kind, key_len, frame_len, seq, batch, body_len, body_crc, fsalt), key


def record_crc(record: bytes | memoryview) -> int:
    """The crc32 a record carries in its last 4 bytes; ``CorruptBlockError`` if it is shorter."""
    if len(record) < 4:
        raise CorruptBlockError(f"a record of {len(record)} bytes has no checksum")
    return struct.unpack_from("<I", record, len(record) - 4)[0]


def check_record(record: memoryview, crc: int, where: str) -> None:
    """``CorruptBlockError`` unless ``record`` is intact and carries checksum ``crc``."""
    if len(record) < 4 or crc32(record[:-4]) != crc or record_crc(record) != crc:
        raise CorruptBlockError(f"{where}: record checksum mismatch")


# ---------------------------------------------------------------------- segment header


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    """What a segment file's header says: its id, salt, and where its first batch starts."""

    seg_id: int
    salt: int
    align: int

    @property
    def data_start(self) -> int:
        """Offset of the first batch, in bytes (the header is padded to the alignment)."""
        return self.align


def pack_segment_header(seg_id: int, salt: int, align: int) -> bytes:
    fixed = _SEGMENT.pack(SEGMENT_MAGIC, FORMAT_VERSION, align, seg_id, salt, 0)[:-4]
    return (fixed + struct.pack("<I", zlib.crc32(fixed))).ljust(align, b"\0")


def parse_segment_header(data: bytes | memoryview, path: object) -> SegmentHeader:
    """The header of segment file ``path`` from its first bytes ``data``. ``StoreError`` if the
    file was written in another format version (the store cannot be read: nothing is migrated);
    ``CorruptBlockError`` if the header is damaged (the frames still name the salt)."""
    if len(data) >= _V1_HEADER.size and bytes(data[:4]) == FRAME_MAGIC:
        *fields, crc = _V1_HEADER.unpack_from(data)
        key_len = fields[2]
        key = bytes(data[_V1_HEADER.size : _V1_HEADER.size + key_len])
        if zlib.crc32(bytes(data[: _V1_HEADER.size - 4]) + key) == crc:
            raise StoreError(f"{path} was written by an older tiercache (disk store format 1); this one "
                             f"reads format {FORMAT_VERSION} only. Delete the store and save its contexts "
                             "again.")
    if len(data) < SEGMENT_HEADER_SIZE:
        raise CorruptBlockError(f"{path}: segment header truncated ({len(data)} bytes)")
    magic, version, align, seg_id, salt, crc = _SEGMENT.unpack_from(data)
    if magic != SEGMENT_MAGIC or zlib.crc32(bytes(data[: SEGMENT_HEADER_SIZE - 4])) != crc:
        raise CorruptBlockError(f"{path}: segment header damaged")
    if version != FORMAT_VERSION:
        raise StoreError(f"{path} is disk store format {version}; this tiercache reads format "
                         f"{FORMAT_VERSION} only. Delete the store and save its contexts again.")
    if align < 512 or align & (align - 1):
        raise CorruptBlockError(f"{path}: segment header names alignment {align}")
    return SegmentHeader(seg_id, salt, align)
