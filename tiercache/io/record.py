"""The self-describing block record: what the disk tier (and any byte store) keeps per block.

Layout (little-endian)::

    magic  b"TCKV"          4 bytes
    version                 u16
    header length H         u32
    payload length P        u64
    header                  H bytes of UTF-8 JSON: codec name and parameters, dtype, kv_heads,
                            block_tokens, head_dim, tokens, key ([seq, layer, index] or null),
                            fp (the digest of the ``tiercache.fingerprint.Fingerprint`` of the
                            KV, or null for a tier's private blocks)
    payload                 P bytes, the codec's output
    crc32                   u32 over everything before it

No pickle: the header is JSON, the payload is the codec's bytes. ``decode_record`` checks every
field and the checksum before decoding and raises ``CorruptBlockError`` naming the record; it
never returns garbage.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import torch

from ..blocks import BlockKey, BlockLayout
from ..errors import ConfigError, CorruptBlockError, FingerprintError, ShapeError
from .checksum import crc32
from .codec import Codec, make_codec

MAGIC = b"TCKV"
VERSION = 4  # 2: cachegen streams use our interleaved rANS coder (tiercache.io.ans); 3: cachegen
#              payloads carry per-token recency codes; 4: the header names the KV's fingerprint
#: Versions before model fingerprints: refused with a ``FingerprintError`` saying so.
_UNFINGERPRINTED = (1, 2, 3)
_PREFIX = struct.Struct("<4sHIQ")
_CRC = struct.Struct("<I")
_MAX_HEADER = 1 << 16
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True, slots=True)
class RecordHeader:
    """What a record says about its block."""

    codec: str
    params: dict
    layout: BlockLayout
    tokens: int
    key: BlockKey | None
    fingerprint: str | None = None


def encode_record(codec: Codec, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                  key: BlockKey | None = None, end: int | None = None,
                  fingerprint: str | None = None) -> bytes:
    """Encode a block's keys and values ``(kv_heads, tokens, head_dim)`` into one record.

    ``end``: the final length in tokens of the block's sequence, when known (a saved context);
    it needs a ``key``, which gives the block's position. ``fingerprint``: the digest of the
    KV's ``Fingerprint`` (every stored context's records carry one).
    """
    tokens = layout.check(k, v, what=str(key) if key else "record")
    if layout.dtype not in _DTYPE_NAMES:
        raise ShapeError(f"encode_record: KV of dtype {layout.dtype} cannot be stored; records hold "
                         f"{', '.join(_DTYPES)}: convert the KV first")
    if end is not None and key is None:
        raise ShapeError("encode_record: end needs a key (the block's position in its sequence)")
    # A key gives the block's position in its sequence, for codecs that code positions differently.
    encoded = codec.encode_at(k, v, key.index * layout.block_tokens, end) if key else codec.encode(k, v)
    payload = encoded.cpu().numpy().tobytes()
    header = json.dumps(
        {
            "codec": codec.name,
            "params": codec.params(),
            "dtype": _DTYPE_NAMES[layout.dtype],
            "kv_heads": layout.kv_heads,
            "block_tokens": layout.block_tokens,
            "head_dim": layout.head_dim,
            "tokens": tokens,
            "key": [key.seq, key.layer, key.index] if key else None,
            "fp": fingerprint,
        },
        separators=(",", ":"),
        sort_keys=True,
    ).encode()
    body = _PREFIX.pack(MAGIC, VERSION, len(header), len(payload)) + header + payload
    return body + _CRC.pack(crc32(body))


def record_length(prefix: bytes, where: str = "record") -> int:
    """Total length in bytes of the record whose first ``prefix_size()`` bytes are ``prefix``."""
    magic, version, hlen, plen = _unpack_prefix(prefix, where)
    return _PREFIX.size + hlen + plen + _CRC.size


def prefix_size() -> int:
    """Bytes needed by ``record_length`` to learn a record's length."""
    return _PREFIX.size


def _unpack_prefix(data: bytes | memoryview, where: str) -> tuple[bytes, int, int, int]:
    if len(data) < _PREFIX.size:
        raise CorruptBlockError(f"{where}: truncated, {len(data)} bytes is shorter than a record prefix")
    magic, version, hlen, plen = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise CorruptBlockError(f"{where}: bad magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION and version not in _UNFINGERPRINTED:
        raise CorruptBlockError(f"{where}: format version {version}, this tiercache reads version {VERSION}")
    if hlen > _MAX_HEADER:
        raise CorruptBlockError(f"{where}: header length {hlen} exceeds {_MAX_HEADER}")
    return magic, version, hlen, plen


def read_header(data: bytes | memoryview, where: str = "record") -> tuple[RecordHeader, memoryview]:
    """Validate a whole record (lengths, checksum, header fields); return its header and payload."""
    data = memoryview(data)
    _, _, hlen, plen = _unpack_prefix(data, where)
    total = _PREFIX.size + hlen + plen + _CRC.size
    if len(data) != total:
        raise CorruptBlockError(f"{where}: {len(data)} bytes, the record's lengths say {total}")
    (crc,) = _CRC.unpack_from(data, total - _CRC.size)
    if crc32(data[: total - _CRC.size]) != crc:
        raise CorruptBlockError(f"{where}: checksum mismatch")
    version = _PREFIX.unpack_from(data)[1]
    if version != VERSION:  # intact (the checksum held), but older than model fingerprints
        raise FingerprintError(f"{where}: record format {version} was written by a tiercache without model "
                               "fingerprints: nothing says which model's KV it holds, so it is not served; "
                               "encode the context again (delete the old store)")
    try:
        h = json.loads(bytes(data[_PREFIX.size : _PREFIX.size + hlen]))
        layout = BlockLayout(h["kv_heads"], h["block_tokens"], h["head_dim"], _DTYPES[h["dtype"]])
        key = BlockKey(*h["key"]) if h["key"] is not None else None
        for name, want in (("codec", str), ("fp", (str, type(None)))):
            if not isinstance(h[name], want):
                raise TypeError(f"{name} is {h[name]!r:.80}")
        header = RecordHeader(h["codec"], dict(h["params"]), layout, int(h["tokens"]), key, h["fp"])
    except (ValueError, KeyError, TypeError, OverflowError, ShapeError, RecursionError) as exc:
        raise CorruptBlockError(f"{where}: unreadable header: {exc}") from exc
    if not 1 <= header.tokens <= layout.block_tokens:
        raise CorruptBlockError(f"{where}: header says {header.tokens} tokens of {layout.block_tokens}")
    return header, data[_PREFIX.size + hlen : _PREFIX.size + hlen + plen]


def decode_record(data: bytes | memoryview, device: torch.device | str = "cpu", where: str = "record",
                  fingerprint: str | None = None) -> tuple[RecordHeader, torch.Tensor, torch.Tensor]:
    """Validate and decode a record; return its header, keys and values on ``device``.

    ``where`` names the record in error messages (e.g. ``"segment 3 offset 4096"``).
    ``fingerprint``: the digest the record must name (``FingerprintError`` otherwise, before
    anything is decoded).
    """
    header, payload = read_header(data, where)
    if fingerprint is not None:
        check_fingerprint(header, fingerprint, where)
    try:
        codec = make_codec(header.codec, **header.params)
    except ConfigError as exc:
        raise CorruptBlockError(f"{where}: {exc}") from exc
    payload_t = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if len(payload) else torch.empty(0, dtype=torch.uint8)
    try:
        k, v = codec.decode(payload_t, header.layout, header.tokens, device)
    except CorruptBlockError as exc:
        raise CorruptBlockError(f"{where}: {exc}") from exc
    return header, k, v


def check_fingerprint(header: RecordHeader, digest: str, where: str = "record") -> None:
    """``FingerprintError`` unless the record ``header`` describes names fingerprint ``digest``."""
    if header.fingerprint != digest:
        held = f"fingerprint {header.fingerprint[:16]}" if header.fingerprint else "no fingerprint"
        raise FingerprintError(f"{where}: the record holds KV of {held}, not of this model and setting "
                               f"({digest[:16]}): refused")
