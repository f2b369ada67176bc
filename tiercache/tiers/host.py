"""The warm tier: host memory.

- ``HostSlab``: rows of ``row_nbytes`` bytes (one encoded block each). The budget is a ceiling,
  not a reservation: the rows are one virtual range that the OS backs with memory only where
  rows are written, and rows are handed out lowest first, so the memory taken is the high-water
  mark of rows in use. With CUDA, each slab of ``SLAB_NBYTES`` is pinned (``cudaHostRegister``)
  when the first row in it is handed out, so copies to the device run as DMA and kernels can
  read rows in place; pinning all of a large budget up front would take seconds and all of that
  memory.
- ``HostTier``: blocks encoded by a fixed-size codec (``raw`` or ``quant``) in the rows of a
  ``HostSlab``. The decode step reads rows by a device tensor of row indices (``read``), so it is
  addressed by rows, not keys; the manager keeps which (layer, pid) each row holds, in numpy, off
  the step's path. It takes and gives blocks in the device slab's token-major layout ``(n,
  block_tokens, 2, kv_heads, head_dim)``; with the raw codec a row is exactly those bytes, so a
  copy to the device needs no transpose.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..blocks import BlockLayout, TierName
from ..errors import CapacityError, ConfigError
from ..io.codec import Codec
from ..kernels.rows import gather_rows, scatter_rows

#: Granularity of pinning host memory with CUDA: 64 MiB.
SLAB_NBYTES = 64 << 20
_PAGE = 4096


class HostSlab:
    """``rows`` rows of ``row_shape`` elements of ``dtype`` (one encoded block each) in host
    memory, handed out lowest first, plus a scratch row (index ``rows``) that masked gathers
    read. Memory is taken as rows are first used, and pinned in slabs of ``SLAB_NBYTES`` with
    CUDA (module docstring)."""

    def __init__(self, row_shape: tuple[int, ...], dtype: torch.dtype, rows: int, pin: bool | None = None) -> None:
        self.rows = rows
        self.row_nbytes = math.prod(row_shape) * dtype.itemsize
        self.pin = torch.cuda.is_available() if pin is None else pin
        nbytes = (rows + 1) * self.row_nbytes
        # torch.empty does not touch the pages: the OS backs them with memory on first write. The
        # rows start on a page, so slabs pinned one by one never share a page.
        buf = torch.empty(nbytes + _PAGE, dtype=torch.uint8)
        start = -buf.data_ptr() % _PAGE
        self.data = buf[start : start + nbytes].view(dtype).view(rows + 1, *row_shape)
        self._pinned: set[int] = set()
        # numpy, not torch: host bookkeeping must not dispatch ops (they would count as syncs).
        # A stack of free rows with the lowest on top: freed rows are reused before new memory.
        self._free = np.arange(rows - 1, -1, -1, dtype=np.int64)
        self._n_free = rows
        self._high_water = 0
        if self.pin:
            self._pin_bytes(rows * self.row_nbytes, nbytes)  # the scratch row

    @property
    def scratch(self) -> int:
        """Index of the scratch row."""
        return self.rows

    @property
    def num_free(self) -> int:
        """Rows not holding a block."""
        return self._n_free

    @property
    def used_rows(self) -> int:
        """Rows holding a block."""
        return self.rows - self._n_free

    @property
    def committed_bytes(self) -> int:
        """Host memory taken so far: every row up to the highest ever handed out (bytes)."""
        return self._high_water * self.row_nbytes

    def alloc(self, n: int) -> np.ndarray:
        """``n`` free rows (int64), lowest first; ``CapacityError`` if fewer are free."""
        if n > self._n_free:
            raise CapacityError(f"host tier: {n} blocks do not fit in {self._n_free} free rows")
        rows = self._free[self._n_free - n : self._n_free][::-1].copy()
        self._n_free -= n
        if n:
            top = int(rows.max()) + 1
            if top > self._high_water:
                if self.pin:
                    self._pin_bytes(self._high_water * self.row_nbytes, top * self.row_nbytes)
                self._high_water = top
        return rows

    def free(self, rows: np.ndarray) -> None:
        """Return ``rows`` to the free stack."""
        n = len(rows)
        self._free[self._n_free : self._n_free + n] = np.asarray(rows)[::-1]
        self._n_free += n

    def _pin_bytes(self, start: int, stop: int) -> None:
        """Pin (CUDA) every slab holding a byte of ``[start, stop)`` of the rows not pinned yet."""
        base, total = self.data.data_ptr(), (self.rows + 1) * self.row_nbytes
        cudart = torch.cuda.cudart()
        for slab in range(start // SLAB_NBYTES, -(-stop // SLAB_NBYTES)):
            if slab in self._pinned:
                continue
            size = min(SLAB_NBYTES, total - slab * SLAB_NBYTES)
            # Portable | mapped: kernels on any device read the rows through the host pointer.
            err = cudart.cudaHostRegister(base + slab * SLAB_NBYTES, size, 3)
            if int(err) != 0:
                raise CapacityError(f"host tier: pinning {size} bytes failed (cudaError {int(err)})")
            self._pinned.add(slab)


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
