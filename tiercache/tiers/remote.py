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

from collections.abc import Callable

from ..blocks import BlockKey, BlockLayout, TierName
from ..config import TierConfig
from ..errors import BlockNotFoundError, CapacityError, ConfigError, StoreError
from ..io.codec import Codec
from ..io.redis_store import RedisStore
from .base import RecordTier

#: Seconds a block outlives its last write or read (what a killed process leaves behind).
BLOCK_TTL_SECONDS = 24 * 3600


class RemoteTier(RecordTier):
    """Blocks in a Redis server, each encoded by ``codec`` into one record; at most
    ``budget_bytes`` of records."""

    name = TierName.REMOTE
    write_through = True
    store: RedisStore

    def __init__(self, store: RedisStore, codec: Codec, layout: BlockLayout, budget_bytes: int,
                 block_ttl_seconds: int = BLOCK_TTL_SECONDS) -> None:
        super().__init__(store, codec, layout)
        self.budget_bytes = budget_bytes
        self.block_ttl_seconds = block_ttl_seconds
        self.owner = store.new_owner()
        self._sizes: dict[BlockKey, int] = {}
        self._used = 0

    @classmethod
    def from_config(cls, config: TierConfig, layout: BlockLayout) -> "RemoteTier":
        """The remote tier ``config`` describes (``remote_url``, ``remote_budget_bytes``,
        ``remote_codec``)."""
        if config.remote_url is None or config.remote_budget_bytes <= 0:
            raise ConfigError("the remote tier needs remote_url and remote_budget_bytes > 0")
        store = RedisStore(config.remote_url)
        return cls(store, cls.config_codec(config), layout, config.remote_budget_bytes)

    def _name(self, key: BlockKey) -> str:
        return self.store.key("blk", self.owner, key.seq, key.layer, key.index)

    @property
    def capacity_bytes(self) -> int:
        return self.budget_bytes

    @property
    def used_bytes(self) -> int:
        return self._used

    def _put_records(self, keys: list[BlockKey], records: list[bytes]) -> list[int]:
        grow = sum(map(len, records)) - sum(self._sizes.get(k, 0) for k in set(keys))
        if self._used + grow > self.budget_bytes:
            left = self.budget_bytes - self._used
            raise CapacityError(f"remote tier at {self.store.url}: {len(keys)} blocks need {grow} more "
                                f"bytes, {left} of remote_budget_bytes={self.budget_bytes} left")
        self.store.put_records([self._name(k) for k in keys], records, self.block_ttl_seconds)
        for key, record in zip(keys, records):
            self._used += len(record) - self._sizes.get(key, 0)
            self._sizes[key] = len(record)
        return [len(r) for r in records]

    def _read_records(self, keys: list[BlockKey], then: Callable[[BlockKey, bytes, str], None]) -> None:
        names = [self._name(k) for k in keys]
        records = self.store.get_records(names, self.block_ttl_seconds)

        def check_then(i: int) -> None:
            where = f"redis {self.store.url} {names[i]}"
            if records[i] is None:
                raise BlockNotFoundError(f"{where}: {keys[i]} is gone from the server (evicted by its "
                                         "maxmemory policy, or a restart without its data); the remote "
                                         "tier holds live blocks: give it a server with maxmemory-policy "
                                         "noeviction")
            then(keys[i], records[i], where)

        list(self.store.executor.map(check_then, range(len(keys))))

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
