"""Saved contexts: a whole prompt's KV cache stored under a content key (on disk, in Redis: any
``ContextBackend``), to be loaded in this or another process, on this or another machine,
instead of recomputing the prefill.

The key is deterministic (``content_key``: blake2b of the fingerprint's digest and the token
ids), never Python's per-process ``hash``. A context of ``L`` layers and ``T`` tokens is stored
as records of ``chunk_tokens`` tokens, record ``(layer, chunk)`` under ``BlockKey(0, layer,
chunk)`` in its own header beside the fingerprint's digest, so loading needs nothing but the
records, and never serves KV of another model or setting.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch

from ..blocks import BlockKey, BlockLayout
from ..errors import ConfigError, CorruptBlockError, ShapeError
from ..fingerprint import Fingerprint, storage_fingerprint
from ..io.codec import Codec
from ..io.record import RecordHeader, decode_record, encode_record
from .backends import ContextBackend


#: Tokens per record of a saved context (records are the unit of parallel reads and decoding).
CHUNK_TOKENS = 256


def content_key(fingerprint: str, token_ids: Sequence[int]) -> str:
    """Hex blake2b-256 of ``fingerprint`` (a ``Fingerprint.digest``) and ``token_ids``: the same
    in every process, run and machine, and different for every other model or setting."""
    h = hashlib.blake2b(digest_size=32)
    h.update(fingerprint.encode())
    h.update(b"\0")
    h.update(np.asarray(token_ids, dtype="<i8").tobytes())
    return h.hexdigest()


def save_kv_context(store: ContextBackend, name: str, kv: torch.Tensor, codec: Codec,
                    fingerprint: Fingerprint, chunk_tokens: int = CHUNK_TOKENS) -> int:
    """Save ``kv``, shaped ``(layers, 2, kv_heads, tokens, head_dim)``, as context ``name``, encoded
    with ``codec`` in records of ``chunk_tokens`` tokens (bytes per record: 2 x kv_heads x
    chunk_tokens x head_dim x element size, before the codec), each naming ``fingerprint``.
    Returns the bytes stored. ``ConfigError`` if ``fingerprint`` does not describe exactly this
    storage (layers, layout, dtype, codec and its parameters, tokens per record)."""
    if kv.dim() != 5 or kv.shape[1] != 2:
        raise ShapeError(f"context {name!r}: kv has shape {tuple(kv.shape)}, "
                         "expected (layers, 2, kv_heads, tokens, head_dim)")
    layers, _, heads, tokens, head_dim = kv.shape
    layout = BlockLayout(heads, chunk_tokens, head_dim, kv.dtype)
    actual = storage_fingerprint(fingerprint.model, layers, layout, codec)
    if actual != fingerprint:
        raise ConfigError(f"context {name!r}: the fingerprint does not describe this KV and codec: "
                          f"{', '.join(fingerprint.differences(actual))}")
    digest = fingerprint.digest

    def encode(part: BlockKey) -> bytes:
        a = part.index * chunk_tokens
        # The context is whole: its length lets codecs code old tokens coarser.
        return encode_record(codec, kv[part.layer, 0, :, a : a + chunk_tokens],
                             kv[part.layer, 1, :, a : a + chunk_tokens], layout, part, end=tokens,
                             fingerprint=digest)

    parts = [BlockKey(0, layer, c) for layer in range(layers) for c in range(-(-tokens // chunk_tokens))]
    return store.save_context(name, list(store.executor.map(encode, parts)))


def load_kv_context(store: ContextBackend, name: str, fingerprint: Fingerprint,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """Load context ``name`` as ``(layers, 2, kv_heads, tokens, head_dim)`` on ``device``; records
    are read and decoded in parallel. ``FingerprintError`` if a record names another fingerprint
    than ``fingerprint`` (or none), ``CorruptBlockError`` if a record fails its checks or the
    records do not tile a context, ``BlockNotFoundError`` if it is not stored (whole)."""
    digest = fingerprint.digest

    def decode(_key, record: memoryview, where: str) -> tuple[RecordHeader, torch.Tensor, torch.Tensor]:
        return decode_record(record, device, where, fingerprint=digest)

    parts = store.load_context(name, verify=False, then=decode)
    first = parts[0][0]
    if any(h.key is None for h, _, _ in parts):
        raise CorruptBlockError(f"context {name!r}: a record does not name its (layer, chunk)")
    layers = 1 + max(h.key.layer for h, _, _ in parts)
    chunks = len(parts) // layers
    if chunks * layers != len(parts):
        raise CorruptBlockError(f"context {name!r}: {len(parts)} records do not split into {layers} layers")
    chunk = first.layout.block_tokens
    tokens = sum(h.tokens for h, _, _ in parts[:chunks])
    lay = first.layout
    out = torch.empty((layers, 2, lay.kv_heads, tokens, lay.head_dim), dtype=lay.dtype, device=device)

    def place(i: int) -> None:
        h, k, v = parts[i]
        expected = BlockKey(0, i // chunks, i % chunks)
        a = expected.index * chunk
        if h.key != expected or h.layout != lay or a + h.tokens > tokens:
            raise CorruptBlockError(
                f"context {name!r}: record {i} is {h.key} with {h.tokens} tokens, expected {expected}"
            )
        out[expected.layer, 0, :, a : a + h.tokens] = k
        out[expected.layer, 1, :, a : a + h.tokens] = v

    list(store.executor.map(place, range(len(parts))))  # copies in parallel
    return out

