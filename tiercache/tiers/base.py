"""``BackingTier``: a tier below host memory (disk, a Redis server) that keeps whole blocks under
their ``BlockKey`` and moves them in batches: the manager hands it ``n`` blocks as one ``(n, 2,
kv_heads, block_tokens, head_dim)`` tensor and gets them back the same way.

``RecordTier`` is the plumbing both backing tiers share: each block becomes one self-describing
record (``tiercache.io.record``) and back. ``tiercache.tiers.disk.DiskTier`` (a ``DiskStore`` on
local disk) and ``tiercache.tiers.remote.RemoteTier`` (a Redis server; write-through) say only
where the records go.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import torch

from ..blocks import BlockKey, BlockLayout, TierName
from ..config import TierConfig
from ..errors import ConfigError, CorruptBlockError
from ..io.codec import Codec, make_codec
from ..io.record import decode_record, encode_record, prefix_size

#: Upper bound of a record's JSON header, in bytes (it is about 230).
_MAX_RECORD_HEADER = 1024


class BackingTier(ABC):
    """A tier below the host. Capacity and usage are in bytes of the tier's own encoding.

    ``write_through``: the manager writes every sealed block here as it seals it (besides host
    memory), so that demoting it later writes nothing; otherwise blocks arrive when host memory
    demotes them."""

    name: TierName
    layout: BlockLayout
    write_through: bool = False

    @property
    @abstractmethod
    def capacity_bytes(self) -> int:
        """Bytes this tier may hold."""

    @property
    @abstractmethod
    def used_bytes(self) -> int:
        """Bytes held now."""

    @abstractmethod
    def free_blocks(self) -> int:
        """How many more full blocks are sure to fit."""

    @abstractmethod
    def write_many(self, keys: list[BlockKey], kv: torch.Tensor, tokens: list[int]) -> list[int]:
        """Store blocks ``keys`` (``kv`` is ``(n, 2, kv_heads, block_tokens, head_dim)``, with
        ``tokens[i]`` valid positions in block ``i``); return the bytes each now takes here.
        ``CapacityError`` if they do not all fit, in which case nothing is stored."""

    @abstractmethod
    def read_many(self, keys: list[BlockKey], tokens: list[int], device: torch.device) -> torch.Tensor:
        """The blocks ``keys`` as ``(n, 2, kv_heads, block_tokens, head_dim)`` on ``device``
        (positions past ``tokens[i]`` are unspecified). The blocks stay stored."""

    @abstractmethod
    def remove(self, key: BlockKey) -> None:
        """Forget block ``key`` and reclaim its space."""

    def remove_many(self, keys: list[BlockKey]) -> None:
        """Forget blocks ``keys`` (a tier with round trips does it in one)."""
        for key in keys:
            self.remove(key)

    @abstractmethod
    def __contains__(self, key: object) -> bool: ...

    def close(self) -> None:
        """Release what the tier holds open (files, connections). Idempotent."""


class RecordStore(Protocol):
    """Where a ``RecordTier`` keeps its records (a ``DiskStore``, a ``RedisStore``)."""

    @property
    def executor(self) -> ThreadPoolExecutor:
        """Threads for work next to the I/O: encoding records, decoding them."""


class RecordTier(BackingTier):
    """A backing tier keeping each block as one self-describing record (``tiercache.io.record``),
    encoded by ``codec``, in ``store``. Records are encoded and decoded on the store's threads, in
    parallel; a record is served only as the block it names, in this tier's ``layout``, with the
    tokens the manager expects. Subclasses store, read and account for the records."""

    def __init__(self, store: RecordStore, codec: Codec, layout: BlockLayout) -> None:
        self.store = store
        self.codec = codec
        self.layout = layout
        self._largest_record = 0

    @classmethod
    def config_codec(cls, config: TierConfig) -> Codec:
        """The codec ``config`` names for this tier (``disk_codec``, ``remote_codec``, with its
        parameters)."""
        return make_codec(getattr(config, f"{cls.name.value}_codec"),
                          **getattr(config, f"{cls.name.value}_codec_params"))

    def block_bytes_bound(self) -> int:
        """Upper bound of the bytes of one full block's record. For codecs of data-dependent
        size it assumes the payload is no larger than the raw block (or the largest seen)."""
        payload = self.codec.fixed_nbytes(self.layout, self.layout.block_tokens) or self.layout.nbytes
        return prefix_size() + _MAX_RECORD_HEADER + max(payload, self._largest_record) + 4

    def free_blocks(self) -> int:
        return max(0, self.capacity_bytes - self.used_bytes) // self.block_bytes_bound()

    def write_many(self, keys: list[BlockKey], kv: torch.Tensor, tokens: list[int]) -> list[int]:
        if len(keys) != kv.shape[0] or len(keys) != len(tokens):
            raise ConfigError(
                f"{self.name.value} tier: {len(keys)} keys, {kv.shape[0]} blocks and {len(tokens)} token "
                "counts"
            )
        kv = kv.to("cpu")

        def encode(i: int) -> bytes:
            t = tokens[i]
            return encode_record(self.codec, kv[i, 0, :, :t], kv[i, 1, :, :t], self.layout, keys[i])

        # On the store's threads, in parallel (codecs release the GIL in torch and zlib).
        records = list(self.store.executor.map(encode, range(len(keys))))
        self._largest_record = max([self._largest_record, *map(len, records)])
        return self._put_records(keys, records)

    def read_many(self, keys: list[BlockKey], tokens: list[int], device: torch.device) -> torch.Tensor:
        out = torch.empty((len(keys), 2, *self.layout.shape), dtype=self.layout.dtype, device=device)
        rows: dict[BlockKey, list[int]] = {}
        for i, key in enumerate(keys):
            rows.setdefault(key, []).append(i)

        def decode_into_out(key: BlockKey, record: bytes | memoryview, where: str) -> None:
            header, k, v = decode_record(record, device, where)
            for i in rows[key]:
                # Never serve another block's KV: the record names the block it holds.
                if header.key != key or header.layout != self.layout or header.tokens != tokens[i]:
                    raise CorruptBlockError(f"{where}: record holds {header.key} ({header.tokens} tokens of "
                                            f"{header.layout}), expected {key} ({tokens[i]} tokens)")
                out[i, 0, :, : tokens[i]] = k
                out[i, 1, :, : tokens[i]] = v

        self._read_records(list(rows), decode_into_out)
        return out

    @abstractmethod
    def _put_records(self, keys: list[BlockKey], records: list[bytes]) -> list[int]:
        """Store ``records`` (whole records) under ``keys``, all or none (``CapacityError`` if
        they do not fit); return the bytes each takes."""

    @abstractmethod
    def _read_records(self, keys: list[BlockKey],
                      then: Callable[[BlockKey, bytes | memoryview, str], None]) -> None:
        """Read the record of every key in ``keys`` and run ``then(key, record, where)`` on each
        (on the store's threads; ``where`` names the record for messages); raise what a read or
        a ``then`` raised."""
