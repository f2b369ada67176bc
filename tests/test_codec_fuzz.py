"""Fuzzing: garbage, truncated and mutated payloads and records never crash, hang or decode silently.

Codec level (no checksum): decoding raises ``CorruptBlockError`` or returns tensors of the right
shape and dtype. Record level (crc32 over everything): every mutation raises ``CorruptBlockError``.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiercache.blocks import BlockKey, BlockLayout
from tiercache.errors import CorruptBlockError, ShapeError
from tiercache.io.codec import make_codec
from tiercache.io.record import decode_record, encode_record

LAYOUT = BlockLayout(2, 16, 32)
CODECS = [
    ("raw", {}),
    ("quant", {"bits": 2, "group_size": 16}),
    ("quant", {"bits": 4, "group_size": 8, "key_mode": "token"}),
    ("quant", {"bits": 8}),
    ("cachegen", {}),
    ("cachegen", {"key_step": 0.5, "value_step": 0.01, "sink_tokens": 8}),
    ("zstd", {}),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in p.items())}" for n, p in CODECS]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _block(seed: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = (torch.randn(2, tokens, 32, generator=g) * 2 + 1).half()
    v = torch.randn(2, tokens, 32, generator=g).half()
    return k, v


def _decode_or_reject(codec, payload: bytes, tokens: int) -> None:
    t = (
        torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        if payload
        else torch.empty(0, dtype=torch.uint8)
    )
    try:
        k, v = codec.decode(t, LAYOUT, tokens, "cpu")
    except CorruptBlockError:
        return
    for x in (k, v):
        assert x.shape == (2, tokens, 32) and x.dtype == torch.float16


@pytest.mark.parametrize("name,params", CODECS, ids=IDS)
@FUZZ
@given(data=st.binary(max_size=3000), tokens=st.integers(1, 16))
def test_codec_random_payloads(name, params, data, tokens):
    _decode_or_reject(make_codec(name, **params), data, tokens)


@pytest.mark.parametrize("name,params", CODECS, ids=IDS)
@FUZZ
@given(seed=st.integers(0, 2**16), tokens=st.integers(1, 16), data=st.data())
def test_codec_mutated_payloads(name, params, seed, tokens, data):
    codec = make_codec(name, **params)
    # At position 0, so cachegen's payloads include raw sink tokens.
    payload = bytearray(codec.encode_at(*_block(seed, tokens), 0).numpy().tobytes())
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend", "splice"]))
    if kind == "flip":
        at = data.draw(st.integers(0, len(payload) - 1))
        payload[at] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        payload = payload[: data.draw(st.integers(0, len(payload) - 1))]
    elif kind == "extend":
        payload += data.draw(st.binary(min_size=1, max_size=64))
    else:
        at = data.draw(st.integers(0, len(payload)))
        payload[at : at + 8] = data.draw(st.binary(min_size=8, max_size=8))
    _decode_or_reject(codec, bytes(payload), tokens)


@pytest.mark.parametrize("name,params", CODECS, ids=IDS)
def test_codec_truncation_always_rejected_when_size_is_known(name, params):
    codec = make_codec(name, **params)
    payload = codec.encode_at(*_block(1, 16), 0)
    for cut in (0, 1, payload.numel() // 2, payload.numel() - 1):
        with pytest.raises(CorruptBlockError):
            codec.decode(payload[:cut], LAYOUT, 16, "cpu")


def test_zstd_frame_declaring_a_huge_size_is_refused_before_allocating():
    # The frame header descriptor (byte 4) switched to an 8-byte content size: the next bytes
    # then declare about 4 EB, which decompress would try to allocate (a MemoryError).
    payload = bytearray(make_codec("zstd").encode(*_block(1, 16)).numpy().tobytes())
    payload[4] = (payload[4] | 0xC0) & ~0x20
    with pytest.raises(CorruptBlockError, match="declares"):
        make_codec("zstd").decode(torch.frombuffer(payload, dtype=torch.uint8), LAYOUT, 16, "cpu")


def _record(name: str, params: dict, seed: int, tokens: int) -> bytes:
    # Blocks 0 and 1 of a sequence: with and without cachegen's raw sink tokens.
    return encode_record(make_codec(name, **params), *_block(seed, tokens), LAYOUT, BlockKey(0, 0, seed % 2))


@pytest.mark.parametrize("name,params", CODECS, ids=IDS)
@FUZZ
@given(seed=st.integers(0, 2**16), tokens=st.integers(1, 16), data=st.data())
def test_record_mutations_always_raise(name, params, seed, tokens, data):
    record = bytearray(_record(name, params, seed, tokens))
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
    if kind == "flip":
        at = data.draw(st.integers(0, len(record) - 1))
        record[at] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        record = record[: data.draw(st.integers(0, len(record) - 1))]
    else:
        record += data.draw(st.binary(min_size=1, max_size=32))
    with pytest.raises(CorruptBlockError):
        decode_record(bytes(record))


@FUZZ
@given(data=st.binary(max_size=400))
def test_random_records_raise(data):
    with pytest.raises(CorruptBlockError):
        decode_record(b"TCKV" + data)


def test_wrong_version_record_raises():
    record = bytearray(_record("cachegen", {}, 0, 16))
    struct.pack_into("<H", record, 4, 99)
    with pytest.raises(CorruptBlockError, match="version"):
        decode_record(bytes(record))


def test_record_with_valid_checksum_but_garbage_payload_raises():
    """A record re-checksummed after its payload was replaced must still fail in the codec."""
    import zlib

    good = _record("cachegen", {}, 0, 16)
    body = bytearray(good[:-4])
    body[-10:] = bytes(10)
    forged = bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))
    with pytest.raises(CorruptBlockError):
        decode_record(forged)


def _forged(header: bytes, payload: bytes = b"") -> bytes:
    """A record whose header is ``header`` (UTF-8 JSON or not), checksummed as if whole."""
    import zlib

    body = struct.pack("<4sHIQ", b"TCKV", 4, len(header), len(payload)) + header + payload
    return body + struct.pack("<I", zlib.crc32(body))


_GOOD = {"codec": "raw", "params": {}, "dtype": "float16", "kv_heads": 2, "block_tokens": 16, "head_dim": 32,
         "tokens": 1, "key": None, "fp": None}


@pytest.mark.parametrize("header", [
    b"[" * 30000 + b"]" * 30000,  # nested past the JSON parser's depth
    b"\xff\xfe not UTF-8",
    json.dumps({**_GOOD, "codec": ["raw"]}).encode(),  # not a name: unhashable where codecs are looked up
    json.dumps({**_GOOD, "tokens": 1e400}).encode(),  # inf: no int
    json.dumps({**_GOOD, "dtype": "float64"}).encode(),
    json.dumps({**_GOOD, "key": {"seq": 0}}).encode(),
    json.dumps([_GOOD]).encode(),
], ids=["deep", "utf8", "codec-list", "tokens-inf", "dtype", "key-dict", "list"])
def test_forged_record_headers_raise_corrupt_block_error(header):
    """Records whose checksum holds but whose header is no record header: refused as damaged,
    never with a bare Python exception."""
    with pytest.raises(CorruptBlockError, match="unreadable header"):
        decode_record(_forged(header, bytes(2 * 2 * 32 * 2)))


def test_a_dtype_records_cannot_hold_is_refused_when_encoding():
    layout = BlockLayout(2, 16, 32, torch.float64)
    k = torch.zeros(2, 4, 32, dtype=torch.float64)
    with pytest.raises(ShapeError, match="float64 cannot be stored.*convert"):
        encode_record(make_codec("raw"), k, k, layout)
