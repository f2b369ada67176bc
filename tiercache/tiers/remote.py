"""The remote tier: the manager's tier below host memory and disk, on a Redis server
(``tiercache.io.redis_store``), written through as blocks are sealed and read on a miss.

Blocks are encoded by a codec into the same self-describing, checksummed records as the disk
tier's, one Redis value each, written and read in one pipelined round trip per batch. Their
keys name this tier instance (``RedisStore.new_owner``: host, pid and random bits), because a
block id means something only to the manager that made it: no other process ever reads them.
``close`` removes them; a process killed leaves them to expire after ``block_ttl_seconds``
(every read renews it).

They are live data, not a cache: a block the server evicted (``maxmemory``) or lost (a restart
without persistence) cannot be recomputed here, so reading it raises ``BlockNotFoundError``
saying so; never anything else in its place.
"""

from __future__ import annotations

import torch

from ..blocks import BlockKey, BlockLayout, TierName
from ..config import TierConfig
from ..errors import BlockNotFoundError, CapacityError, ConfigError, CorruptBlockError, StoreError
from .base import BackingTier
from ..io.codec import Codec, make_codec
from ..io.record import decode_record, encode_record, prefix_size
from ..io.redis_store import RedisStore

#: Upper bound of a record's JSON header, in bytes (it is about 230).
_MAX_RECORD_HEADER = 1024
#: Seconds a block outlives its last write or read (what a killed process leaves behind).
BLOCK_TTL_SECONDS = 24 * 3600


class RemoteTier(BackingTier):
    """Blocks in a Redis server, each encoded by ``codec`` into one record; at most
    ``budget_bytes`` of records."""

    name = TierName.REMOTE
    write_through = True

    def __init__(self, store: RedisStore, codec: Codec, layout: BlockLayout, budget_bytes: int,
                 block_ttl_seconds: int = BLOCK_TTL_SECONDS) -> None:
        self.store = store
        self.codec = codec
        self.layout = layout
        self.budget_bytes = budget_bytes
        self.block_ttl_seconds = block_ttl_seconds
        self.owner = store.new_owner()
        self._sizes: dict[BlockKey, int] = {}
        self._used = 0
        self._largest_record = 0

    @classmethod
    def from_config(cls, config: TierConfig, layout: BlockLayout) -> "RemoteTier":
        """The remote tier ``config`` describes (``remote_url``, ``remote_budget_bytes``,
        ``remote_codec``)."""
        if config.remote_url is None or config.remote_budget_bytes <= 0:
            raise ConfigError("the remote tier needs remote_url and remote_budget_bytes > 0")
        codec = make_codec(config.remote_codec, **config.remote_codec_params)
        return cls(RedisStore(config.remote_url), codec, layout, config.remote_budget_bytes)

    def _name(self, key: BlockKey) -> str:
        return self.store.key("blk", self.owner, key.seq, key.layer, key.index)

    @property
    def capacity_bytes(self) -> int:
        return self.budget_bytes

    @property
    def used_bytes(self) -> int:
        return self._used

    def block_bytes_bound(self) -> int:
        """Upper bound of the bytes of one full block's record. For codecs of data-dependent
        size it assumes the payload is no larger than the raw block (or the largest seen)."""
        payload = self.codec.fixed_nbytes(self.layout, self.layout.block_tokens) or self.layout.nbytes
        return prefix_size() + _MAX_RECORD_HEADER + max(payload, self._largest_record) + 4

    def free_blocks(self) -> int:
        return max(0, self.budget_bytes - self._used) // self.block_bytes_bound()

    def write_many(self, keys: list[BlockKey], kv: torch.Tensor, tokens: list[int]) -> list[int]:
        if len(keys) != kv.shape[0] or len(keys) != len(tokens):
            raise ConfigError(
                f"remote tier: {len(keys)} keys, {kv.shape[0]} blocks and {len(tokens)} token counts"
            )
        kv = kv.to("cpu")

        def encode(i: int) -> bytes:
            t = tokens[i]
            return encode_record(self.codec, kv[i, 0, :, :t], kv[i, 1, :, :t], self.layout, keys[i])

        records = list(self.store.executor.map(encode, range(len(keys))))
        grow = sum(map(len, records)) - sum(self._sizes.get(k, 0) for k in set(keys))
        if self._used + grow > self.budget_bytes:
            left = self.budget_bytes - self._used
            raise CapacityError(f"remote tier at {self.store.url}: {len(keys)} blocks need {grow} more "
                                f"bytes, {left} of remote_budget_bytes={self.budget_bytes} left")
        self.store.put_records([self._name(k) for k in keys], records, self.block_ttl_seconds)
        for key, record in zip(keys, records):
            self._used += len(record) - self._sizes.get(key, 0)
            self._sizes[key] = len(record)
        self._largest_record = max([self._largest_record, *map(len, records)])
        return [len(r) for r in records]

    def read_many(self, keys: list[BlockKey], tokens: list[int], device: torch.device) -> torch.Tensor:
        records = self.store.get_records([self._name(k) for k in keys], self.block_ttl_seconds)
        out = torch.empty((len(keys), 2, *self.layout.shape), dtype=self.layout.dtype, device=device)

        def decode_into_out(i: int) -> None:
            key, record = keys[i], records[i]
            where = f"redis {self.store.url} {self._name(key)}"
            if record is None:
                raise BlockNotFoundError(f"{where}: {key} is gone from the server (evicted by its maxmemory "
                                         "policy, or a restart without its data); the remote tier holds live "
                                         "blocks: give it a server with maxmemory-policy noeviction")
            header, k, v = decode_record(record, device, where)
            # Never serve another block's KV: the record names the block it holds.
            if header.key != key or header.layout != self.layout or header.tokens != tokens[i]:
                raise CorruptBlockError(f"{where}: record holds {header.key} ({header.tokens} tokens of "
                                        f"{header.layout}), expected {key} ({tokens[i]} tokens)")
            out[i, 0, :, : tokens[i]] = k
            out[i, 1, :, : tokens[i]] = v

        list(self.store.executor.map(decode_into_out, range(len(keys))))
        return out

    def remove(self, key: BlockKey) -> None:
        self.remove_many([key])

    def remove_many(self, keys: list[BlockKey]) -> None:
        self.store.delete_records([self._name(k) for k in keys])
        for key in keys:
            self._used -= self._sizes.pop(key, 0)

    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    def close(self) -> None:
        """Remove this tier's blocks from the server and close the connection. Idempotent. A
        server that cannot be reached keeps them until they expire (``block_ttl_seconds``)."""
        if self.store.closed:
            return
        try:
            if self._sizes:
                self.remove_many(list(self._sizes))
        except StoreError:
            pass  # closing runs after errors too; the blocks expire on their own
        finally:
            self.store.close()
