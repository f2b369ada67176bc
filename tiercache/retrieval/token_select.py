"""Which tokens one layer reads at one step with the token index (``TokenIndex``), and the
estimate of the ones it does not read: a plan in host integers, then a tensor pipeline.

**The budget is what is read**, per KV head: ``RetrievalConfig.budget`` tokens (a fraction of
the cached tokens, or a count), sink and window included; each KV head reads its own tokens.
The window always covers the tokens not indexed yet (the open block, at most ``block_tokens -
1``): that is the floor of a read.

**Selection** (``select``), with shapes fixed by the plan and no host sync: every query head
(and query position) scores every indexed token from its code: a lookup table of the query's
dot products with every codebook centroid, read at each token's codes and summed; the KV head
takes each token's best score over its query heads, and its top ``plan.retrieve`` tokens outside
sink and window are read, with sink and window: ``positions`` ``(rows, kv_heads, plan.read)``.

**The estimate** (``estimate``): the tokens of each run that a step does not read stand in one
virtual token per query head, the run's mean key weighted by their count, with the run's mean
value; attended in the same softmax as the tokens read (RetroInfer's estimation zone, at token
resolution).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import RetrievalConfig
from .clusters import SUBSPACE
from .token_index import TokenIndex


@dataclass(frozen=True)
class TokenPlan:
    """What one layer reads at a context of ``n_tokens`` tokens, per KV head, in tokens."""

    n_tokens: int
    sink: int  # first tokens, always read
    window: int  # last tokens, always read (every token not indexed yet among them)
    retrieve: int  # tokens selected between them
    indexed: int  # tokens scored: positions [0, indexed)
    full: bool  # every token is read

    @property
    def read(self) -> int:
        return self.n_tokens if self.full else self.sink + self.window + self.retrieve


def plan(config: RetrievalConfig, layer: int, n_tokens: int, indexed: int) -> TokenPlan:
    """The read plan of ``layer`` at ``n_tokens`` tokens of which ``indexed`` are indexed
    (module docstring). The window shrinks first when sink and window would take more than the
    budget, down to the tokens not indexed."""
    budget = config.layer_budgets.get(layer, config.budget)
    read = budget if isinstance(budget, int) else math.floor(budget * n_tokens)
    unindexed = n_tokens - indexed
    read = max(read, unindexed)
    if layer in config.full_attention_layers or read >= n_tokens:
        return TokenPlan(n_tokens, n_tokens, 0, 0, indexed, True)
    window = min(max(config.window_tokens, unindexed), read)
    sink = min(config.sink_tokens, read - window)
    candidates = max(0, min(indexed, n_tokens - window) - sink)
    return TokenPlan(n_tokens, sink, window, min(read - sink - window, candidates), indexed, False)


@dataclass
class Prefix:
    """What every layer's selection at one step shares (the block table's padding, the plan's
    sink and window), computed once per step: ``bias`` ``(rows * kv_heads, indexed)`` fp32 (-inf:
    padding, sink or window, never selected); ``positions`` ``(rows * kv_heads, sink + window)``
    the sink and window tokens, and ``runs_read`` ``(rows * kv_heads, runs)`` how many of them
    each run holds; ``padded``: whether some token is padding."""

    bias: torch.Tensor
    positions: torch.Tensor
    runs_read: torch.Tensor
    ones: torch.Tensor  # (rows * kv_heads, retrieve) fp32 ones: a count per token selected
    padded: bool


def prefix(plan: TokenPlan, token_bias: torch.Tensor, heads: int, run: int, padded: bool) -> Prefix:
    """The ``Prefix`` of a step at ``plan`` (``token_bias`` ``(rows, >= n_tokens)``: 0 for a real
    token, -inf for padding)."""
    t, n, device = plan.indexed, plan.n_tokens, token_bias.device
    bias = token_bias[:, :t].float().repeat_interleave(heads, 0)
    bias[:, : plan.sink] = float("-inf")
    bias[:, n - plan.window : t] = float("-inf")
    edges = torch.cat([torch.arange(plan.sink, device=device), torch.arange(n - plan.window, n, device=device)])
    inside = edges[: plan.sink + max(0, t - n + plan.window)]   # the ones indexed, in some run
    runs_read = torch.zeros(-(-t // run), device=device).index_add_(0, inside // run, torch.ones_like(inside,
                                                                                                    dtype=torch.float32))
    b = bias.shape[0]
    return Prefix(bias, edges.expand(b, -1), runs_read.expand(b, -1), torch.ones(b, plan.retrieve, device=device),
                  padded)


@dataclass
class Selection:
    """A step's selection, and what its estimate needs."""

    positions: torch.Tensor  # (rows, kv_heads, read) int64: sink, window, selected
    missing: torch.Tensor | None  # (rows, kv_heads, read) bias: -inf where a slot holds no token
    picked: torch.Tensor  # (rows * kv_heads, retrieve) the selected tokens


def select(plan: TokenPlan, queries: torch.Tensor, index: TokenIndex, layer: int, shared: Prefix,
           scaling: float) -> Selection:
    """The tokens each KV head reads for ``queries`` ``(rows, q_heads, q_len, head_dim)`` (module
    docstring), at the step whose shared part is ``shared``."""
    rows, _, _, dim = queries.shape
    heads, m, t = index.kv_heads, index.subspaces, plan.indexed
    b = rows * heads
    books = index.books_of(layer)                                             # (B, m, 4, S * 16)
    # The query's dot products with every centroid, (B, m, Gq, S * 16), read at each token's
    # code in every subspace and summed.
    q = (queries * scaling).reshape(b, -1, m, SUBSPACE).transpose(1, 2).reshape(b * m, -1, SUBSPACE)
    table = torch.bmm(q.to(books.dtype), books.reshape(b * m, SUBSPACE, -1)).view(b, m, -1, books.shape[3])
    codes = index.codes[layer][:, :, :t]                                      # (B, m / 2, t)
    nibbles = torch.cat((codes & 15, codes >> 4), 1)                          # (B, m, t)
    lookup = (index.offsets(t) + nibbles)[:, :, None].expand(-1, -1, table.shape[2], -1)
    logits = table.gather(3, lookup).sum(1).float() + shared.bias[:, None]   # (B, Gq, t)
    score, picked = logits.amax(1).topk(plan.retrieve, dim=-1)              # (B, k)
    positions = torch.cat([shared.positions, picked], 1)
    missing = None
    if shared.padded:  # with padding, fewer tokens than the budget may exist: those slots read nothing
        missing = torch.cat([score.new_zeros(b, shared.positions.shape[1]),
                             torch.where(torch.isneginf(score), float("-inf"), 0.0)], 1).view(rows, heads, -1)
    return Selection(positions.view(rows, heads, -1), missing, picked)


def estimate(sel: Selection, shared: Prefix, index: TokenIndex, layer: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The virtual tokens standing for every indexed token a step did not read, one per run
    (module docstring): keys and values ``(rows * kv_heads, runs, head_dim)``, the run's mean
    key and mean value, and their score bias ``(rows * kv_heads, runs)``, the log of the run's
    tokens not read (-inf: none). The mean key stands for every key of the run, so the estimate
    of its unread tokens is ``exp(q . mean key) * unread``, a lower bound by Jensen's inequality;
    its mean value is the value (taking out the values read changed the output error by 0.0004
    at 4K tokens: they weigh little in a mean of 128). Measured against the log-sum-exp of the
    unread tokens' code logits: recall of attention mass 0.967 against 0.958 at a 10% read of 4K
    tokens (noisy code logits overestimate the mass)."""
    dim, runs = index.head_dim, shared.runs_read.shape[1]
    means = index.runs[layer][:, :runs]
    read = shared.runs_read.scatter_add(1, sel.picked // index.run, shared.ones)
    return means[..., :dim], means[..., dim:], (index.run_counts[layer][:, :runs] - read).log()
