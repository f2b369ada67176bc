"""The frame: how the disk store lays entries out inside a segment file.

A segment is a sequence of frames, each starting with a fixed binary header (little-endian)::

    magic  b"TCSF"        4 bytes
    kind                  u8   PUT, DELETE or COMMIT
    (pad)                 1 byte
    key length K          u16  bytes of the UTF-8 JSON key that follows the header
    frame length          u64  bytes from this header to the next frame, padding included
    seq                   u64  sequence number of the write that created the entry
    body length B         u64  PUT: record bytes; COMMIT: number of frames in the batch
    body crc32            u32  PUT: the record's own crc32 (its last 4 bytes); else 0
    header crc32          u32  over the 36 bytes above plus the key

then the key, then the body (a ``tiercache.io.record`` record for PUT), then zero padding.
Writes are batches of PUT/DELETE frames closed by one COMMIT frame: a batch without its COMMIT
frame (a writer killed mid-write) is not part of the store.

PUT and COMMIT frames are padded to the store's alignment (4 KiB by default) and a batch writes
its PUT frames before its DELETE frames, so every PUT frame starts aligned and its record can be
read with ``O_DIRECT``; DELETE frames are small and only 8-byte aligned.

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
from ..errors import CorruptBlockError, ShapeError

FRAME_MAGIC = b"TCSF"
_HEADER = struct.Struct("<4sBxHQQQII")
HEADER_SIZE = _HEADER.size
_CRC_OFFSET = HEADER_SIZE - 4
#: Small frames (DELETE, COMMIT) are padded to this many bytes.
SMALL_ALIGN = 8
#: Longest context key accepted, in characters (keys are stored in every frame header).
MAX_CONTEXT_KEY = 1024


class FrameKind(enum.IntEnum):
    PUT = 1
    DELETE = 2
    COMMIT = 3


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
    """Inverse of ``key_to_json``; ``ValueError`` if ``value`` is not a key."""
    if isinstance(value, list) and len(value) == 4 and value[0] == "b":
        try:
            return BlockKey(*value[1:])
        except ShapeError as exc:
            raise ValueError(str(exc)) from exc
    if (isinstance(value, list) and len(value) == 3 and value[0] == "c" and isinstance(value[1], str)
            and isinstance(value[2], int) and value[2] >= 0):
        return ContextPart(value[1], value[2])
    raise ValueError(f"not a store key: {value!r:.100}")


def round_up(n: int, align: int) -> int:
    return -(-n // align) * align


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """A parsed frame header."""

    kind: FrameKind
    key_len: int
    frame_len: int
    seq: int
    body_len: int
    body_crc: int

    @property
    def body_offset(self) -> int:
        """Offset of the body from the frame's start, in bytes."""
        return HEADER_SIZE + self.key_len


def pack_frame(kind: FrameKind, seq: int, key: bytes, body: bytes | memoryview, body_len: int,
               body_crc: int, frame_len: int) -> list[bytes | memoryview]:
    """The bytes of one frame as parts to write in order (header+key, body, padding)."""
    fixed = _HEADER.pack(FRAME_MAGIC, kind, len(key), frame_len, seq, body_len, body_crc, 0)[:_CRC_OFFSET]
    head = fixed + struct.pack("<I", zlib.crc32(fixed + key)) + key
    pad = frame_len - len(head) - len(body)
    return [head, body, bytes(pad)] if pad else [head, body]


def frame_length(kind: FrameKind, key_len: int, body_len: int, align: int) -> int:
    """Bytes a frame takes. PUT and COMMIT frames are padded to ``align``; a batch writes its PUT
    frames first, so every PUT, and every batch, starts aligned."""
    n = HEADER_SIZE + key_len + (body_len if kind == FrameKind.PUT else 0)
    return round_up(n, SMALL_ALIGN if kind == FrameKind.DELETE else align)


def parse_header(data: bytes | memoryview, where: str) -> tuple[FrameHeader, bytes]:
    """Parse and check a frame header followed by its key; return the header and raw key bytes.

    ``data`` must hold at least ``HEADER_SIZE`` bytes, and the key if the header is valid.
    ``CorruptBlockError`` (naming ``where``) if the magic, lengths or header checksum are wrong.
    """
    if len(data) < HEADER_SIZE:
        raise CorruptBlockError(f"{where}: truncated frame header ({len(data)} of {HEADER_SIZE} bytes)")
    magic, kind, key_len, frame_len, seq, body_len, body_crc, crc = _HEADER.unpack_from(data)
    if magic != FRAME_MAGIC:
        raise CorruptBlockError(f"{where}: bad frame magic {bytes(magic)!r}, expected {FRAME_MAGIC!r}")
    if len(data) < HEADER_SIZE + key_len:
        raise CorruptBlockError(f"{where}: truncated frame key")
    key = bytes(data[HEADER_SIZE : HEADER_SIZE + key_len])
    if zlib.crc32(bytes(data[:_CRC_OFFSET]) + key) != crc:
        raise CorruptBlockError(f"{where}: frame header checksum mismatch")
    try:
        kind = FrameKind(kind)
    except ValueError:
        raise CorruptBlockError(f"{where}: unknown frame kind {kind}") from None
    if frame_len < HEADER_SIZE + key_len + (body_len if kind == FrameKind.PUT else 0):
        raise CorruptBlockError(f"{where}: frame length {frame_len} is shorter than its contents")
    return FrameHeader(kind, key_len, frame_len, seq, body_len, body_crc), key
