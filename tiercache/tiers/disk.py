"""The disk tier: the tier manager's third tier, blocks encoded by a codec into records kept in a
``DiskStore`` (``tiercache.io.store``), where saved contexts may live next to them.

Blocks (``BlockKey``) are the manager's live data: they are never evicted, and a write that does
not fit raises ``CapacityError``. Their sequence ids mean something only to the process that
made them, so a ``DiskTier`` drops the blocks a previous process left when it opens the store
(it keeps saved contexts, which are keyed by content and meant to outlive processes).
"""

from __future__ import annotations

from collections.abc import Callable

from ..blocks import BlockKey, BlockLayout, TierName
from ..config import TierConfig
from ..errors import ConfigError
from ..io.codec import Codec
from ..io.store import DiskStore
from .base import RecordTier

#: A BlockKey with the widest fields a frame key can plausibly have, to bound frame sizes.
_WIDE_KEY = BlockKey(2**40, 2**20, 2**40)


class DiskTier(RecordTier):
    """Blocks in a ``DiskStore``, each encoded by ``codec`` into one record."""

    name = TierName.DISK
    store: DiskStore

    def __init__(self, store: DiskStore, codec: Codec, layout: BlockLayout,
                 keep_blocks: bool = False) -> None:
        """``keep_blocks``: keep the blocks a previous process left (a read-only store always does)."""
        super().__init__(store, codec, layout)
        if not keep_blocks and not store.readonly and store.block_keys():
            store.delete(store.block_keys(), sync=False)

    @classmethod
    def from_config(cls, config: TierConfig, layout: BlockLayout) -> "DiskTier":
        """The disk tier ``config`` describes (``disk_path``, ``disk_budget_bytes``, ``disk_codec``)."""
        if config.disk_budget_bytes <= 0 or config.disk_path is None:
            raise ConfigError("the disk tier needs disk_budget_bytes > 0 and a disk_path")
        return cls(DiskStore(config.disk_path, config.disk_budget_bytes), cls.config_codec(config), layout)

    @property
    def capacity_bytes(self) -> int:
        return self.store.capacity_bytes

    @property
    def used_bytes(self) -> int:
        return self.store.used_bytes

    def block_bytes_bound(self) -> int:
        """Upper bound of the bytes one full block takes on disk: its record in a frame."""
        return self.store.frame_bytes(_WIDE_KEY, super().block_bytes_bound())

    def _put_records(self, keys: list[BlockKey], records: list[bytes]) -> list[int]:
        # Blocks are live data: only saved contexts may be evicted to make room, and not here.
        return self.store.put_many(list(zip(keys, records)))

    def _read_records(self, keys: list[BlockKey], then: Callable[[BlockKey, memoryview, str], None]) -> None:
        # Decoding and copying run on the I/O threads, in parallel, as each read completes.
        for future in self.store.read_async(keys, verify=False, then=then):
            future.result()

    def remove(self, key: BlockKey) -> None:
        # No fsync: a block whose removal a crash undoes is dropped at the next open anyway.
        self.store.delete([key], sync=False)

    def remove_seq(self, seq: int) -> int:
        """Remove every block of sequence ``seq``; return how many."""
        return self.store.delete_seq(seq)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, BlockKey) and key in self.store

    def close(self) -> None:
        self.store.close()
