"""``BlockEstimates``: what a step needs to estimate the attention it gives the blocks it does not
read (RetroInfer's estimation zone).

Attention over the tokens of a block ``b`` is ``sum_i exp(q . k_i) v_i``. Taking every key of the
block as the block's mean key ``k_b`` gives ``exp(q . k_b) * n_b * v_b`` with ``n_b`` its count of
real tokens and ``v_b`` its mean value: one *virtual token* per block with key ``k_b``, value
``v_b`` and an additive score bias ``log n_b``. The decode step appends the virtual tokens of the
blocks it does not read to the ones it reads, so one softmax merges the exact and the estimated
parts (``kernels.attention.paged_attention``'s ``extra``). Jensen's inequality makes the estimate
of each block a lower bound of its true weight, so it never outweighs what it stands for; a
variance correction (``exp(q . k_b + q^T S_b q / 2)``) measured worse (benchmarks/RESULTS.md).

Per layer and row the means sit contiguous in block order, ``(rows, kv_heads, blocks_capacity,
head_dim)``, written when a block is sealed; ``log_count`` ``(rows, blocks_capacity)`` is the same
for every layer, -inf for a block not sealed (or of padding only).
"""

from __future__ import annotations

import torch

from ..capacity import grown


class BlockEstimates:
    """Mean keys and values of ``layers`` layers' sealed blocks for ``rows`` rows."""

    def __init__(self, layers: int, rows: int, kv_heads: int, head_dim: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.keys = [torch.zeros(rows, kv_heads, 0, head_dim, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(rows, kv_heads, 0, head_dim, dtype=dtype, device=device) for _ in range(layers)]
        self.log_count = torch.full((rows, 0), float("-inf"), dtype=dtype, device=device)

    def seal(self, layer: int, first: int, kv: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Record blocks ``first, first + 1, ...`` of ``layer`` from their tokens ``kv`` ``(rows, n,
        block_tokens, 2, kv_heads, head_dim)`` (the slab's layout) and validity ``(rows, n,
        block_tokens)`` (None: every token is real)."""
        n, bt = kv.shape[1], kv.shape[2]
        self._reserve(first + n)
        if valid is None:
            means = kv.mean(2)
            count = torch.full((kv.shape[0], n), float(bt), device=kv.device)
        else:
            weight = valid[..., None, None, None].to(kv.dtype)
            count = valid.sum(-1)
            means = (kv * weight).sum(2) / count.clamp(min=1)[..., None, None, None].to(kv.dtype)
        self.keys[layer][:, :, first : first + n] = means[:, :, 0].transpose(1, 2)
        self.values[layer][:, :, first : first + n] = means[:, :, 1].transpose(1, 2)
        self.log_count[:, first : first + n] = count.log()

    def extra(self, layer: int, n_blocks: int, read: torch.Tensor, sealed: int | None = None):
        """The virtual tokens of the first ``n_blocks`` blocks of ``layer`` that a step does not
        read (``read`` ``(rows, k)`` block indices): keys and values ``(rows, kv_heads, n_blocks,
        head_dim)`` and the score bias ``(rows, n_blocks)``: -inf for the blocks read and, given
        ``sealed``, from that block on (a prefill's first layer may have sealed blocks that this
        layer has not yet; a decode step always reads its last, possibly just sealed, block)."""
        self._reserve(n_blocks)
        bias = self.log_count[:, :n_blocks].scatter(1, read, float("-inf"))
        if sealed is not None and sealed < n_blocks:
            bias[:, sealed:] = float("-inf")
        return self.keys[layer][:, :, :n_blocks], self.values[layer][:, :, :n_blocks], bias

    def cut(self, sealed: int) -> None:
        """Forget every block from ``sealed`` on (a cut leaves the blocks before it sealed)."""
        self.log_count[:, sealed:] = float("-inf")

    def reorder(self, index: torch.Tensor) -> None:
        """Row ``r`` becomes old row ``index[r]`` (beam search)."""
        self.keys = [k[index] for k in self.keys]
        self.values = [v[index] for v in self.values]
        self.log_count = self.log_count[index]

    def _reserve(self, blocks: int) -> None:
        if blocks <= self.log_count.shape[1]:
            return
        self.keys = [grown(t, 2, blocks) for t in self.keys]
        self.values = [grown(t, 2, blocks) for t in self.values]
        self.log_count = grown(self.log_count, 1, blocks, float("-inf"))
