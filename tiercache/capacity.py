"""Growing a tensor's capacity along one dimension by doubling, so that adding entries one at a
time costs amortised O(1): the block table's validity, the unit index, the block estimates."""

from __future__ import annotations

import torch


def grown(t: torch.Tensor, dim: int, needed: int, fill: float = 0.0, multiple: int = 1) -> torch.Tensor:
    """``t`` with its capacity along ``dim`` raised to at least ``needed`` entries (doubling, 64 at
    least, rounded up to a multiple of ``multiple``); new entries hold ``fill``. ``t`` itself when
    it is large enough."""
    size = t.shape[dim]
    if needed <= size:
        return t
    shape = list(t.shape)
    shape[dim] = -(-max(needed, 2 * size, 64) // multiple) * multiple
    out = t.new_full(shape, fill)
    out.narrow(dim, 0, size).copy_(t)
    return out
