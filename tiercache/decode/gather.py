"""Reading single tokens of every KV head in place: token-granular retrieval reads its selection
this way, and the token index reads a segment's keys to train and seal.

A sealed block is always in host memory (write-through) unless it was demoted below it; with
token retrieval the open block is written there too as tokens arrive (``decode.kv``); and the
host tier's raw rows have the device slab's token-major layout. So every token is gathered from
host rows (from device slots when there is no host tier: every block then stays pinned on the
device).

No host sync: positions become (pid, offset), pids become host rows (or device slots) by the
residency tables, and one ``index_select`` reads keys and values. When a layer has blocks held
only below host memory, the blocks a read needs are read from their tiers first
(``TierManager.read``: a sync and a counted wait).
"""

from __future__ import annotations

import functools

import torch

from ..tiers.manager import TierManager
from .table import BlockTable


def gather_tokens(memory: TierManager, table: BlockTable, layer: int, positions: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys and values ``(rows, kv_heads, n, head_dim)`` of ``layer`` at ``positions`` ``(rows,
    kv_heads, n)`` (head ``h`` reads its own tokens), and their bias ``(rows, kv_heads, n)`` from
    the block table (0 for a real token, -inf for padding)."""
    layout = memory.layout
    bt, heads, dim = layout.block_tokens, layout.kv_heads, layout.head_dim
    rows, _, n = positions.shape
    flat = positions.reshape(rows, -1)
    pids = table.pids.gather(1, flat // bt)
    residency = memory.residency
    if memory.host is None:
        where, source = residency.slot_of(layer, pids), memory.layer_slab(layer)
    elif memory.holds_below_host(layer):
        # Some of the layer's blocks are only on disk (or remote): read the blocks these tokens
        # lie in from whichever tier holds each, without moving them (host memory may be too
        # small for all of them at once). A host sync and a wait, counted by the manager.
        unique, where = torch.unique(pids, return_inverse=True)
        source = memory.read(layer, unique.cpu().numpy(), wait=True)
    else:
        where, source = residency.host_row_of(layer, pids), memory.host.slab.data
    residency.count_token_reads(flat.numel(), memory.host is not None)
    # Rows of head_dim elements: ((row * bt + offset) * 2 + {0: key, 1: value}) * heads + head.
    index = (where * bt + flat % bt) * 2 * heads + _heads(heads, n, positions.device)
    kv = source.view(-1, dim).index_select(0, torch.stack((index, index + heads)).view(-1))
    keys, values = kv.view(2, rows, heads, n, dim).unbind(0)
    return keys, values, table.bias.gather(1, flat).view(rows, heads, n)


@functools.lru_cache(maxsize=16)
def _heads(heads: int, n: int, device: torch.device) -> torch.Tensor:
    """``(heads * n,)``: each KV head's index, ``n`` times (the row offset of head ``h``'s tokens)."""
    return torch.arange(heads, device=device).repeat_interleave(n)
