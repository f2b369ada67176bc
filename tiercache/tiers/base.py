"""``BackingTier``: a tier below host memory (disk, a Redis server) that keeps whole blocks under
their ``BlockKey`` and moves them in batches: the manager hands it ``n`` blocks as one ``(n, 2,
kv_heads, block_tokens, head_dim)`` tensor and gets them back the same way.
``tiercache.tiers.disk.DiskTier`` (local disk) and ``tiercache.tiers.remote.RemoteTier`` (a Redis
server; write-through) are the two.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..blocks import BlockKey, BlockLayout, TierName


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
