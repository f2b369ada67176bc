"""The disk tier: the tier manager's third tier, blocks encoded by a codec into records kept in a
``DiskStore`` (``tiercache.io.store``), where saved contexts may live next to them.

Blocks (``BlockKey``) are the manager's live data: they are never evicted, and a write that does
not fit raises ``CapacityError``. Their sequence ids mean something only to the process that
made them, so a ``DiskTier`` drops the blocks a previous process left when it opens the store
(it keeps saved contexts, which are keyed by content and meant to outlive processes).
"""

from __future__ import annotations

import torch

from ..blocks import BlockKey, BlockLayout, TierName
from ..config import TierConfig
from ..errors import ConfigError, CorruptBlockError
from .base import BackingTier
from ..io.codec import Codec, make_codec
from ..io.record import decode_record, encode_record, prefix_size
from ..io.store import DiskStore

#: Upper bound of a record's JSON header, in bytes (it is about 200).
_MAX_RECORD_HEADER = 1024
#: A BlockKey with the widest fields a frame key can plausibly have, to bound frame sizes.
_WIDE_KEY = BlockKey(2**40, 2**20, 2**40)


class DiskTier(BackingTier):
    """Blocks in a ``DiskStore``, each encoded by ``codec`` into one record."""

    name = TierName.DISK

    def __init__(self, store: DiskStore, codec: Codec, layout: BlockLayout,
                 keep_blocks: bool = False) -> None:
        """``keep_blocks``: keep the blocks a previous process left (a read-only store always does)."""
        self.store = store
        self.codec = codec
        self.layout = layout
        if not keep_blocks and not store.readonly and store.block_keys():
            store.delete(store.block_keys(), sync=False)
        self._largest_record = 0

    @classmethod
    def from_config(cls, config: TierConfig, layout: BlockLayout) -> "DiskTier":
        """The disk tier ``config`` describes (``disk_path``, ``disk_budget_bytes``, ``disk_codec``)."""
        if config.disk_budget_bytes <= 0 or config.disk_path is None:
            raise ConfigError("the disk tier needs disk_budget_bytes > 0 and a disk_path")
        codec = make_codec(config.disk_codec, **config.disk_codec_params)
        return cls(DiskStore(config.disk_path, config.disk_budget_bytes), codec, layout)

    @property
    def capacity_bytes(self) -> int:
        return self.store.capacity_bytes

    @property
    def used_bytes(self) -> int:
        return self.store.used_bytes

    def block_bytes_bound(self) -> int:
        """Upper bound of the bytes one full block takes on disk. For codecs of data-dependent
        size it assumes the payload is no larger than the raw block (or the largest seen)."""
        payload = self.codec.fixed_nbytes(self.layout, self.layout.block_tokens) or self.layout.nbytes
        record = prefix_size() + _MAX_RECORD_HEADER + max(payload, self._largest_record) + 4
        return self.store.frame_bytes(_WIDE_KEY, record)

    def free_blocks(self) -> int:
        return max(0, self.capacity_bytes - self.used_bytes) // self.block_bytes_bound()

    def write_many(self, keys: list[BlockKey], kv: torch.Tensor, tokens: list[int]) -> list[int]:
        if len(keys) != kv.shape[0] or len(keys) != len(tokens):
            raise ConfigError(
                f"disk tier: {len(keys)} keys, {kv.shape[0]} blocks and {len(tokens)} token counts"
            )
        kv = kv.to("cpu")

        def encode(i: int) -> bytes:
            t = tokens[i]
            return encode_record(self.codec, kv[i, 0, :, :t], kv[i, 1, :, :t], self.layout, keys[i])

        # On the I/O threads, in parallel (codecs release the GIL in torch and zlib).
        records = list(self.store.executor.map(encode, range(len(keys))))
        self._largest_record = max([self._largest_record, *map(len, records)])
        # Blocks are live data: only saved contexts may be evicted to make room (the store's rule).
        return self.store.put_many(list(zip(keys, records)))

    def read_many(self, keys: list[BlockKey], tokens: list[int], device: torch.device) -> torch.Tensor:
        out = torch.empty((len(keys), 2, *self.layout.shape), dtype=self.layout.dtype, device=device)
        rows: dict[BlockKey, list[int]] = {}
        for i, key in enumerate(keys):
            rows.setdefault(key, []).append(i)

        def decode_into_out(key: BlockKey, record: memoryview, where: str) -> None:
            header, k, v = decode_record(record, device, where)
            # Never serve another block's KV: the record names the block it holds.
            if header.key != key or header.layout != self.layout:
                raise CorruptBlockError(
                    f"{where}: record holds {header.key} of {header.layout}, expected {key}"
                )
            for i in rows[key]:
                if header.tokens != tokens[i]:
                    raise CorruptBlockError(
                        f"{where}: {key} holds {header.tokens} tokens, the manager expects {tokens[i]}"
                    )
                out[i, 0, :, : tokens[i]] = k
                out[i, 1, :, : tokens[i]] = v

        # Decoding and copying run on the I/O threads, in parallel, as each read completes.
        for future in self.store.read_async(keys, verify=False, then=decode_into_out):
            future.result()
        return out

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
