"""Tiers below the device: where demoted blocks go, each with its own encoding.

A ``BackingTier`` stores whole blocks under their ``BlockKey`` and moves them in batches: the
manager hands it ``n`` blocks as one ``(n, 2, kv_heads, block_tokens, head_dim)`` tensor and gets
them back the same way, so a tier can move many blocks per copy. Only the first ``tokens[i]``
positions of block ``i`` carry data; a tier may store just those.

``HostTier`` (warm, a ``HostPool`` plus a fixed-size codec) lives here; the disk tier is
``tiercache.io.disk.DiskTier``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from .blocks import BlockKey, BlockLayout, TierName
from .errors import BlockNotFoundError, CapacityError, ConfigError
from .io.codec import Codec
from .pools import HostPool

#: Blocks gathered per host-to-device copy (64 blocks of 64 KiB = 4 MiB, past the ~2 MB where DMA
#: reaches full speed).
STAGING_BLOCKS = 64


class BackingTier(ABC):
    """A tier below the device. Capacity and usage are in bytes of the tier's own encoding."""

    name: TierName
    layout: BlockLayout

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

    @abstractmethod
    def __contains__(self, key: object) -> bool: ...


class HostTier(BackingTier):
    """The warm tier: a preallocated (pinned) host slab of fixed-size slots, one encoded block each."""

    name = TierName.HOST

    def __init__(self, layout: BlockLayout, budget_bytes: int, codec: Codec, pin: bool | None = None) -> None:
        slot_nbytes = codec.fixed_nbytes(layout, layout.block_tokens)
        if slot_nbytes is None:
            raise ConfigError(
                f"host codec {codec.name!r} has data-dependent sizes; the host tier needs a fixed-size "
                "codec such as 'raw' or 'quant'"
            )
        self.layout = layout
        self.codec = codec
        self.pool = HostPool(slot_nbytes, budget_bytes, pin)
        self._slots: dict[BlockKey, int] = {}
        pinned = self.pool.slab.is_pinned()
        rows = max(1, min(self.pool.num_slots, STAGING_BLOCKS)) if pinned else 0
        self._staging = torch.empty((rows, slot_nbytes), dtype=torch.uint8, pin_memory=pinned)
        self._staging_free: torch.cuda.Event | None = None

    @property
    def capacity_bytes(self) -> int:
        return self.pool.num_slots * self.pool.slot_nbytes

    @property
    def used_bytes(self) -> int:
        return len(self._slots) * self.pool.slot_nbytes

    def free_blocks(self) -> int:
        return self.pool.num_free

    def write_many(self, keys: list[BlockKey], kv: torch.Tensor, tokens: list[int]) -> list[int]:
        if len(keys) > self.pool.num_free:
            raise CapacityError(f"host tier: {len(keys)} blocks do not fit in {self.pool.num_free} free slots")
        payload = self.codec.encode_many(kv, self.layout)
        slots = [self.pool.alloc() for _ in keys]
        # Device-to-host: a blocking copy, so the host never reads bytes a DMA has not written yet.
        self.pool.slab.index_copy_(0, torch.tensor(slots, dtype=torch.long), payload.to("cpu"))
        self._slots.update(zip(keys, slots))
        return [self.pool.slot_nbytes] * len(keys)

    def read_many(self, keys: list[BlockKey], tokens: list[int], device: torch.device) -> torch.Tensor:
        try:
            slots = torch.tensor([self._slots[k] for k in keys], dtype=torch.long)
        except KeyError as exc:
            raise BlockNotFoundError(f"host tier does not hold {exc.args[0]}") from None
        if not self.pool.slab.is_pinned():
            return self.codec.decode_many(self.pool.slab.index_select(0, slots), self.layout, device)
        # Gather into a pinned staging buffer allocated once, then one DMA per chunk of blocks:
        # many small copies are far slower than one large one.
        parts = []
        for chunk in slots.split(self._staging.shape[0]):
            if self._staging_free is not None:  # the previous DMA out of the buffer must be done
                self._staging_free.synchronize()
            buf = self._staging[: len(chunk)]
            torch.index_select(self.pool.slab, 0, chunk, out=buf)
            parts.append(self.codec.decode_many(buf, self.layout, device))
            self._staging_free = torch.cuda.Event()
            self._staging_free.record()
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def remove(self, key: BlockKey) -> None:
        slot = self._slots.pop(key, None)
        if slot is None:
            raise BlockNotFoundError(f"host tier does not hold {key}")
        self.pool.free(slot)

    def __contains__(self, key: object) -> bool:
        return key in self._slots
