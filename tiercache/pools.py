"""Where block bytes live: the device slab, and host memory taken as it is used.

- ``DeviceSlab``: every layer's device slots in one tensor ``(layers, slots + 1, block_tokens, 2,
  kv_heads, head_dim)`` allocated once; slot ``slots`` of each layer is a scratch slot that
  masked writes of the decode path land in, so a step never needs a data-dependent shape. The
  layout is token-major so that a gather of blocks views as keys ``(kv_heads, tokens,
  head_dim)`` without a copy; tiers below store blocks as ``(2, kv_heads, block_tokens,
  head_dim)`` (``BlockLayout``), and the copies between them permute.
- ``HostSlab``: the warm tier's rows of ``row_nbytes`` bytes (one encoded block each). The budget
  is a ceiling, not a reservation: the rows are one virtual range that the OS backs with memory
  only where rows are written, and rows are handed out lowest first, so the memory taken is the
  high-water mark of rows in use. With CUDA, each slab of ``SLAB_NBYTES`` is pinned
  (``cudaHostRegister``) when the first row in it is handed out, so copies to the device run as
  DMA and kernels can read rows in place; pinning all of a large budget up front would take
  seconds and all of that memory.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .blocks import BlockLayout
from .errors import CapacityError

#: Granularity of pinning host memory with CUDA: 64 MiB.
SLAB_NBYTES = 64 << 20
_PAGE = 4096


class DeviceSlab:
    """``slots`` block slots per layer on ``device``, plus one scratch slot per layer."""

    def __init__(self, layout: BlockLayout, layers: int, slots: int, device: torch.device) -> None:
        self.layout = layout
        self.slots = slots
        # Zeroed once so positions past a partial block's tokens never hold NaN bit patterns.
        self.kv = torch.zeros((layers, slots + 1, layout.block_tokens, 2, layout.kv_heads, layout.head_dim),
                              dtype=layout.dtype, device=device)

    @property
    def scratch(self) -> int:
        """Index of each layer's scratch slot."""
        return self.slots

    @property
    def capacity_bytes(self) -> int:
        """Bytes of the usable slots (the scratch slots excluded)."""
        return self.kv.shape[0] * self.slots * self.layout.nbytes


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
