"""The per-step selector: which blocks of a layer one decode step attends.

A selection is the attention sinks (the first blocks) + the recent window (the last blocks, the
open one included) + the top-scoring blocks in between, all counted in one token budget.
Units: ``n_tokens`` is the layer's context length in tokens; blocks hold ``block_tokens`` tokens
(the last one may be partial); every index returned is a block index within the layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import RetrievalConfig
from ..errors import ShapeError
from .index import Index


@dataclass(frozen=True)
class Selection:
    """Blocks one layer attends at one step, per KV head.

    - ``indices``: ``(kv_heads, k)`` int64 block indices, ascending; the same ``k`` for every head.
    - ``retrieved``: ``(kv_heads, k_top)`` the part chosen by score (not sink or window), ascending.
    - ``n_blocks``: blocks in the layer's context (sealed and open); every index is below it.
    - ``ranked``: ``(kv_heads, k_top)`` the index's picks, best score first, -1 where it found
      fewer (the recent blocks that ``retrieved`` got instead are not in it).
    """

    indices: torch.Tensor
    retrieved: torch.Tensor
    n_blocks: int
    ranked: torch.Tensor

    @property
    def k(self) -> int:
        """Blocks selected per KV head."""
        return self.indices.shape[1]

    def mask(self) -> torch.Tensor:
        """Boolean ``(kv_heads, n_blocks)``: True where the block is selected."""
        out = torch.zeros(self.indices.shape[0], self.n_blocks, dtype=torch.bool, device=self.indices.device)
        return out.scatter_(1, self.indices, True)


@dataclass(frozen=True)
class Plan:
    """Budget arithmetic of one (layer, context length), in blocks."""

    n_blocks: int
    sink: int
    window: int
    top: int  # blocks chosen by score
    full: bool  # attend every block

    @property
    def eligible(self) -> tuple[int, int]:
        """Range of block indices that compete for the ``top`` slots."""
        return (self.sink, self.n_blocks - self.window)


class Selector:
    """Stateless selection for a model whose layers use ``config``.

    ``scaling`` is the attention's softmax scale (``head_dim ** -0.5`` for Llama-family models);
    only the ``"softmax"`` GQA aggregate uses it.
    """

    def __init__(self, config: RetrievalConfig, block_tokens: int, scaling: float) -> None:
        self.config = config
        self.block_tokens = block_tokens
        self.scaling = scaling

    def plan(self, layer: int, n_tokens: int) -> Plan:
        """Blocks of sink, window and top-k for ``layer`` at a context of ``n_tokens`` tokens.

        The budget (``config.layer_budgets.get(layer, config.budget)``; a fraction of ``n_tokens``
        or a token count) is rounded down to whole blocks. Sink and window are never cut: a budget
        below them attends just them.
        """
        if n_tokens < 1:
            raise ShapeError(f"layer {layer}: context must hold >= 1 token, got {n_tokens}")
        bt, cfg = self.block_tokens, self.config
        n_blocks = math.ceil(n_tokens / bt)
        budget = cfg.layer_budgets.get(layer, cfg.budget)
        budget_tokens = budget if isinstance(budget, int) else math.floor(budget * n_tokens)
        sink, window = math.ceil(cfg.sink_tokens / bt), math.ceil(cfg.window_tokens / bt)
        full = layer in cfg.full_attention_layers or budget_tokens >= n_tokens or sink + window >= n_blocks
        if full:
            return Plan(n_blocks, n_blocks, 0, 0, True)
        return Plan(n_blocks, sink, window, max(0, budget_tokens // bt - sink - window), False)

    def select(self, index: Index, queries: torch.Tensor, layer: int, n_tokens: int) -> Selection:
        """Select blocks of ``layer`` for ``queries`` at a context of ``n_tokens`` tokens.

        ``queries``: post-RoPE, ``(q_heads, head_dim)`` or ``(1, q_heads, q_len, head_dim)`` (all
        ``q_len`` positions are scored together, like extra query heads). ``index`` must hold the
        layer's sealed blocks.
        """
        grouped = group_queries(queries, index.kv_heads, index.head_dim)
        plan = self.plan(layer, n_tokens)
        kv_heads, device = grouped.shape[0], grouped.device
        # One spare column receives the index's -1 pads, and is dropped.
        mask = torch.zeros(kv_heads, plan.n_blocks + 1, dtype=torch.bool, device=device)
        mask[:, : plan.sink] = True
        mask[:, plan.n_blocks - plan.window : plan.n_blocks] = True
        top = torch.empty(kv_heads, 0, dtype=torch.int64, device=device)
        if plan.top:
            top = index.search(grouped, plan.top, self.config.gqa_aggregate, self.scaling, plan.eligible)
        top = top.to(device)
        mask.scatter_(1, torch.where(top >= 0, top, plan.n_blocks), True)
        mask = mask[:, :-1]
        _fill_recent(mask, plan, (top < 0).sum(dim=1))
        indices = mask.nonzero()[:, 1].reshape(kv_heads, -1)
        retrieved = indices[:, plan.sink : indices.shape[1] - plan.window]
        return Selection(indices, retrieved, plan.n_blocks, top)


def storage_blocks(ranked: torch.Tensor, per_block: int, n_blocks: int, forced: torch.Tensor,
                   budget_blocks: int) -> torch.Tensor:
    """The ``budget_blocks`` storage blocks one step reads, ascending, for the units each KV head
    ranked best first (``ranked`` ``(kv_heads, r)``, -1 pads; ``per_block`` units per block) in a
    layer of ``n_blocks`` blocks. ``forced`` (sink and window blocks) are always read, and never
    fewer than they.

    A block holds every KV head, so what a step moves between tiers is the union of the heads'
    blocks; scattered per-head units touch many blocks (at a 10% budget of 4-token units in
    16-token blocks, over half of them). This keeps the I/O at the budget: each head's unit of rank
    ``r`` votes ``1 / (r + 1)`` for its block, so every head's best picks come first and a block
    wanted by several heads beats one wanted by one; later blocks win ties. Every token of a block
    read is then attended, by every head: it is on the device already.
    """
    heads, r = ranked.shape
    weight = (1.0 / torch.arange(1, r + 1, dtype=torch.float64, device=ranked.device)).expand(heads, r)
    valid = ranked >= 0
    votes = torch.zeros(n_blocks, dtype=torch.float64, device=ranked.device)
    votes.index_add_(0, (ranked[valid] // per_block), weight[valid])
    votes += torch.arange(n_blocks, dtype=torch.float64, device=votes.device) / (4 * n_blocks * max(r, 1))
    votes[forced] = float("inf")
    return votes.topk(min(n_blocks, max(budget_blocks, forced.numel()))).indices.sort().values


def _fill_recent(mask: torch.Tensor, plan: Plan, missing: torch.Tensor) -> None:
    """Give each head's unfilled top-k slots (an index that found fewer than k eligible blocks) to
    its most recent unselected eligible blocks, so every head selects the same number."""
    lo, hi = plan.eligible
    for head in torch.nonzero(missing).flatten().tolist():
        free = torch.nonzero(~mask[head, lo:hi]).flatten() + lo
        mask[head, free[free.numel() - int(missing[head]) :]] = True


def group_queries(queries: torch.Tensor, kv_heads: int, head_dim: int) -> torch.Tensor:
    """Queries as ``(kv_heads, group, head_dim)``: query head ``i`` reads KV head
    ``i // (q_heads // kv_heads)`` (transformers' ``repeat_kv`` order)."""
    if not isinstance(queries, torch.Tensor):
        raise ShapeError(f"queries must be a torch.Tensor, got {type(queries).__name__}")
    shape = tuple(queries.shape)
    if queries.dim() == 4:
        if shape[0] != 1:
            raise ShapeError(f"queries {shape}: select one sequence at a time (batch 1), not {shape[0]}")
        queries = queries[0]  # (q_heads, q_len, d)
    elif queries.dim() == 2:
        queries = queries.unsqueeze(1)
    else:
        raise ShapeError(f"queries must be (q_heads, head_dim) or (1, q_heads, q_len, head_dim), got {shape}")
    q_heads = queries.shape[0]
    if queries.shape[-1] != head_dim or q_heads % kv_heads:
        raise ShapeError(
            f"queries {shape}: need head_dim {head_dim} and a number of query heads divisible by "
            f"kv_heads={kv_heads}"
        )
    return queries.reshape(kv_heads, -1, head_dim)
