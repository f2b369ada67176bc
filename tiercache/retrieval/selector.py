"""Which blocks one layer reads at one step: a plan in host integers, then a tensor pipeline.

**The budget is what is read.** ``RetrievalConfig.budget`` (a fraction of the cached tokens, or a
token count) is the number of tokens whose K/V a step reads per layer, sink, window and
retrieved blocks together, rounded down to whole storage blocks. When sink + window would take
more than the budget (short contexts), the window shrinks first, down to the open block.

**Selection** (``Selector.select``), for every row at once, with shapes fixed by the plan and no
host sync:

1. every query head (and, for a multi-token query, every position) scores the layer's units
   from their summaries, masked to units that hold a valid token and lie outside sink and window;
2. the scores of the query heads sharing a KV head are combined (``gqa_aggregate``);
3. each KV head ranks its best units, and the unit of rank ``r`` votes ``1 / (r + 1)`` for its
   storage block: a block holds every head, so a step reads the blocks the heads want most;
4. sink and window blocks are forced in, later blocks win ties, and the top ``read`` blocks come
   out, in no particular order: ``(rows, read)`` block indices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import RetrievalConfig
from ..errors import ConfigError, ShapeError
from .summaries import Summary

AGGREGATES = ("max", "sum", "softmax")


@dataclass(frozen=True)
class Plan:
    """What one layer reads at a context of ``n_tokens`` tokens, in blocks and units."""

    n_tokens: int
    block_tokens: int
    n_blocks: int
    n_units: int  # complete units: the ones that have summaries
    read: int  # blocks read, sink and window included
    sink: int  # first blocks, always read
    window: int  # last blocks (the open one included), always read
    top: int  # units each KV head ranks for the vote
    full: bool  # every block is read
    scanned_units: int = 0  # units whose summaries a selection scores (outside sink and window)

    @property
    def read_tokens(self) -> int:
        """Tokens read: whole blocks, but the last (open) one only as far as it is filled."""
        return (self.read - 1) * self.block_tokens + self.n_tokens - (self.n_blocks - 1) * self.block_tokens


def aggregate(scores: torch.Tensor, how: str, scaling: float) -> torch.Tensor:
    """Combine the scores of query heads sharing a KV head: ``(..., group, n)`` -> ``(..., n)``.

    ``"max"``: the best logit; ``"sum"``: the summed logits; ``"softmax"``: each query head's
    softmax over the ``n`` units (``scaling``: the attention's softmax scale), summed, i.e. the
    group's estimated attention share, so one head with large logits cannot outvote the others.
    """
    if how == "max":
        return scores.amax(dim=-2)
    if how == "sum":
        return scores.sum(dim=-2)
    if how == "softmax":
        scores = scores.float()
        return torch.softmax(scores if scaling == 1.0 else scores * scaling, dim=-1).sum(dim=-2)
    raise ConfigError(f"unknown GQA aggregate {how!r}; use one of {AGGREGATES}")


class Selector:
    """Plans and selections for a model whose layers use ``config``: storage blocks of
    ``block_tokens`` tokens, units of ``unit_tokens``, ``summary`` summaries, working on ``device``."""

    def __init__(self, config: RetrievalConfig, block_tokens: int, unit_tokens: int, summary: Summary,
                 device: torch.device) -> None:
        if block_tokens % unit_tokens:
            raise ConfigError(f"block_tokens ({block_tokens}) must be a multiple of unit_tokens ({unit_tokens})")
        self.config = config
        self.block_tokens = block_tokens
        self.unit_tokens = unit_tokens
        self.summary = summary
        self.device = device
        self._ar = torch.zeros(0, dtype=torch.int64, device=device)
        self._bases: dict[tuple, tuple[torch.Tensor, torch.Tensor | int]] = {}
        self._reserve(256)

    def unit_bytes(self, head_dim: int, itemsize: int) -> int:
        """Bytes of one unit's summary of one KV head."""
        return self.summary.rows * self.summary.width(head_dim) * itemsize

    def plan(self, layer: int, n_tokens: int) -> Plan:
        """The read plan of ``layer`` at a context of ``n_tokens`` tokens (module docstring)."""
        if n_tokens < 1:
            raise ShapeError(f"layer {layer}: a read plan needs a context of >= 1 token, got {n_tokens}")
        cfg, bt = self.config, self.block_tokens
        n_blocks = -(-n_tokens // bt)
        budget = cfg.layer_budgets.get(layer, cfg.budget)
        budget_tokens = budget if isinstance(budget, int) else math.floor(budget * n_tokens)
        # The last block is always read, filled or not: count it by its tokens.
        last = n_tokens - (n_blocks - 1) * bt
        read = 1 + max(0, budget_tokens - last) // bt
        n_units = n_tokens // self.unit_tokens
        if layer in cfg.full_attention_layers or read >= n_blocks:
            return Plan(n_tokens, bt, n_blocks, n_units, n_blocks, n_blocks, 0, 0, True)
        sink = min(-(-cfg.sink_tokens // bt), read - 1)
        window = max(1, -(-cfg.window_tokens // bt))
        if sink + window > read:
            window = max(1, read - sink)
        per_block = bt // self.unit_tokens
        eligible = max(0, min(n_units, (n_blocks - window) * per_block) - sink * per_block)
        top = min((read - sink - window) * per_block, eligible)
        return Plan(n_tokens, bt, n_blocks, n_units, read, sink, window, top, False, eligible if top else 0)

    # ------------------------------------------------------------------ tensor pipelines

    def select(self, plan: Plan, queries: torch.Tensor, summaries: torch.Tensor, unit_bias: torch.Tensor | None,
               scaling: float) -> torch.Tensor:
        """Blocks ``(rows, plan.read)`` (distinct, unordered) each row reads for ``queries`` ``(rows,
        q_heads, q_len, head_dim)``, given the layer's ``summaries`` ``(rows, kv_heads, >=
        n_units, ...)``, the attention's softmax scale ``scaling``, and ``unit_bias`` ``(rows, >=
        n_units)`` (0, or -inf for a unit of padding only; None when there is no padding)."""
        if plan.full:
            return self.all_blocks(plan, queries.shape[0])
        return self.votes(plan, queries, summaries, unit_bias, scaling).topk(plan.read, dim=-1).indices

    def votes(self, plan: Plan, queries: torch.Tensor, summaries: torch.Tensor, unit_bias: torch.Tensor | None,
              scaling: float) -> torch.Tensor:
        """The vote table ``(rows, plan.n_blocks)`` that ``select`` takes its top ``plan.read``
        blocks from (same arguments; ``plan`` must not be full): +inf for sink and window."""
        rows, kv_heads, head_dim = queries.shape[0], summaries.shape[1], queries.shape[-1]
        votes, weight, offsets = self._base_votes(plan, rows, kv_heads)
        if plan.top:
            # Only units outside sink and window compete: score just those.
            per_block = self.block_tokens // self.unit_tokens
            lo = plan.sink * per_block
            hi = min(plan.n_units, (plan.n_blocks - plan.window) * per_block)
            units = summaries[:, :, lo:hi]
            grouped = queries.reshape(rows * kv_heads, -1, head_dim)
            # Only the softmax aggregate needs scores in its units; max and sum rank the same unscaled.
            scale = scaling if self.config.gqa_aggregate == "softmax" else 1.0
            scores = self.summary.score(grouped, units.reshape(rows * kv_heads, hi - lo, *units.shape[3:]), scale)
            scores = scores.view(rows, kv_heads, -1, hi - lo)
            if unit_bias is not None:
                scores = scores + unit_bias[:, None, None, lo:hi]
            share = aggregate(scores, self.config.gqa_aggregate, 1.0)
            best, unit = share.topk(plan.top, dim=-1)
            if unit_bias is not None:
                # Units of padding (or fewer eligible ones than top) vote nothing: NaN (an
                # all-masked softmax) compares False too.
                weight = weight * (best > (0.0 if self.config.gqa_aggregate == "softmax" else float("-inf"))).view(-1)
            block = unit if per_block == 1 else unit // per_block
            votes.view(-1).index_add_(0, (block + offsets).view(-1), weight)
        return votes

    def window_blocks(self, n_tokens: int, rows: int) -> torch.Tensor:
        """The sink blocks and the last ``prefill_window_tokens`` of a context of ``n_tokens``
        tokens, whatever the budget (a stream's window prefill), ``(rows, blocks)`` ascending."""
        bt, cfg = self.block_tokens, self.config
        n_blocks = -(-n_tokens // bt)
        sink = min(n_blocks, -(-cfg.sink_tokens // bt))
        window = min(n_blocks - sink, max(1, -(-cfg.prefill_window_tokens // bt)))
        blocks = list(range(sink)) + list(range(n_blocks - window, n_blocks))
        return torch.tensor(blocks, dtype=torch.int64, device=self.device).expand(rows, -1)

    def all_blocks(self, plan: Plan, rows: int) -> torch.Tensor:
        """Every block, ``(rows, n_blocks)``."""
        self._reserve(plan.n_blocks)
        return self._ar[: plan.n_blocks].expand(rows, -1)

    def with_held(self, plan: Plan, held: torch.Tensor) -> torch.Tensor:
        """The blocks ``held`` ``(rows, k)`` (a question's selection) plus ``plan``'s sink and
        window, ``(rows, k + sink + window)`` ascending (fewer if they overlap)."""
        votes, _, _ = self._base_votes(plan, held.shape[0], 1)
        votes.scatter_(1, held, 1.0)
        return votes.topk(min(plan.n_blocks, held.shape[1] + plan.sink + plan.window), dim=-1).indices.sort(-1).values

    def _base_votes(self, plan: Plan, rows: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | int]:
        """For one plan shape, built once: a fresh ``(rows, n_blocks)`` vote table (+inf for sink
        and window blocks, and a tie-break below any real vote that prefers later blocks); the
        rank weights ``1 / (r + 1)`` of every head's ranked units, flat; and what turns a row's
        unit rank into a flat vote index (its row's offset plus the sink)."""
        key = (rows, kv_heads, plan.n_blocks, plan.sink, plan.window, plan.top)
        cached = self._bases.get(key)
        if cached is None:
            nb = plan.n_blocks
            base = torch.arange(nb, dtype=torch.float32, device=self.device) / (4 * nb * max(plan.top, 1))
            base[: plan.sink] = float("inf")
            base[nb - plan.window :] = float("inf")
            weight = (1.0 / torch.arange(1, plan.top + 1, device=self.device)).repeat(rows * kv_heads)
            offsets = plan.sink if rows == 1 else (
                torch.arange(rows, device=self.device) * nb + plan.sink).view(rows, 1, 1)
            if len(self._bases) > 8:
                self._bases.clear()
            cached = self._bases[key] = (base, weight, offsets)
        base, weight, offsets = cached
        return base.repeat(rows, 1), weight, offsets

    def _reserve(self, n: int) -> None:
        """A constant index vector of at least ``n`` entries."""
        if n > self._ar.numel():
            self._ar = torch.arange(max(n, 2 * self._ar.numel(), 256), dtype=torch.int64, device=self.device)
