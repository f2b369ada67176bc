"""The tiers below the device.

- ``HostTier`` (warm): blocks encoded by a fixed-size codec (``raw`` or ``quant``) in the rows of
  a ``HostSlab``. The decode step reads rows by a device tensor of row indices
  (``read``), so it is addressed by rows, not keys; the manager keeps which (layer, pid) each
  row holds, in numpy, off the step's path. It takes and gives blocks in the device slab's
  token-major layout ``(n, block_tokens, 2, kv_heads, head_dim)``; with the raw codec a row is
  exactly those bytes, so a copy to the device needs no transpose.
- ``BackingTier`` (cold: disk, remote): whole blocks under their ``BlockKey``, moved in batches:
  the manager hands it ``n`` blocks as one ``(n, 2, kv_heads, block_tokens, head_dim)`` tensor
  and gets them back the same way. ``tiercache.io.disk.DiskTier`` (local disk) and
  ``tiercache.io.remote.RemoteTier`` (a Redis server; write-through) are the two.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from .blocks import BlockKey, BlockLayout, TierName
from .errors import ConfigError
from .io.codec import Codec
from .kernels.rows import gather_rows, scatter_rows
from .pools import HostSlab


class HostTier:
    """Rows of host memory, one encoded block each (``codec`` must have a fixed size), up to
    ``budget_bytes`` of them."""

    name = TierName.HOST

    def __init__(self, layout: BlockLayout, budget_bytes: int, codec: Codec, pin: bool | None = None) -> None:
        row_nbytes = codec.fixed_nbytes(layout, layout.block_tokens)
        if row_nbytes is None:
            raise ConfigError(
                f"host codec {codec.name!r} has data-dependent sizes; the host tier needs a fixed-size "
                "codec such as 'raw' or 'quant'"
            )
        self.layout = layout
        self.codec = codec
        # Raw rows are blocks in the slab's layout and dtype, so reading one is a plain gather.
        self._raw = codec.name == "raw"
        shape, dtype = ((layout.block_tokens, 2, layout.kv_heads, layout.head_dim), layout.dtype) if self._raw \
            else ((row_nbytes,), torch.uint8)
        self.slab = HostSlab(shape, dtype, budget_bytes // row_nbytes, pin)

    @property
    def row_nbytes(self) -> int:
        """Bytes of one encoded block."""
        return self.slab.row_nbytes

    @property
    def capacity_bytes(self) -> int:
        return self.slab.rows * self.slab.row_nbytes

    @property
    def used_bytes(self) -> int:
        return self.slab.used_rows * self.slab.row_nbytes

    def write(self, rows: np.ndarray, kv: torch.Tensor) -> None:
        """Encode blocks ``kv`` ``(n, block_tokens, 2, kv_heads, head_dim)`` into ``rows``."""
        index = torch.from_numpy(rows).to(kv.device)
        payload = kv if self._raw else self.codec.encode_many(kv.permute(0, 2, 3, 1, 4), self.layout)
        scatter_rows(self.slab.data, index, payload)

    def read(self, rows: torch.Tensor) -> torch.Tensor:
        """The blocks in ``rows`` (a tensor of row indices; ``slab.scratch`` is the scratch row)
        decoded to ``(n, block_tokens, 2, kv_heads, head_dim)`` on ``rows``' device."""
        payload = gather_rows(self.slab.data, rows)
        if self._raw:
            return payload
        return self.codec.decode_many(payload, self.layout, rows.device).permute(0, 3, 1, 2, 4)


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
