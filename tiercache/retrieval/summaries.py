"""Unit summaries: a few vectors per KV head that stand in for a unit's keys when scoring.

A *unit* is ``unit_tokens`` consecutive tokens (a storage block holds several). Summaries are
computed once, when a unit fills, from its **post-RoPE** keys: transformers rotates keys before
they reach the cache, and decode attention compares the post-RoPE query with exactly those keys,
so a summary of the rotated keys bounds or approximates the very logits attention will compute.

Every summary kind stores ``rows`` vectors of ``width`` elements per unit and KV head, and scores
in one matmul: ``score(q) = max_r  query(q) . row_r`` (logit units, before the softmax scale).
Padding tokens never enter a summary; a unit with no valid token is stored as zeros and masked
by the caller.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..config import parse_summary
from ..errors import ConfigError, ShapeError


class Summary(ABC):
    """How a unit is summarised and scored. Stateless; one instance serves every unit."""

    name: str
    #: Vectors stored per unit and KV head.
    rows: int
    #: Factor the selector folds into its query scaling: ``score(q) = query_scale * query(q) . row``.
    query_scale: float = 1.0

    def width(self, head_dim: int) -> int:
        """Elements of each stored vector."""
        return head_dim

    def summarize(self, keys: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Summaries of units of post-RoPE keys ``(..., units, unit_tokens, head_dim)``, counting
        only tokens where ``valid`` ``(..., units, unit_tokens)`` (broadcast) is True. Returns
        ``(..., units, rows, width)`` in the keys' dtype."""
        if not isinstance(keys, torch.Tensor) or keys.dim() < 3 or not keys.is_floating_point():
            got = f"{keys.dtype} {tuple(keys.shape)}" if isinstance(keys, torch.Tensor) else type(keys).__name__
            raise ShapeError(f"{self.name} summary: keys must be floating (..., units, tokens, head_dim), got {got}")
        if valid is None:  # the decode step's case: no padding, no masks
            return self._summarize(keys, None).to(keys.dtype)
        valid = valid.unsqueeze(-1)
        out = self._summarize(keys, valid)
        # A unit of padding only would hold infinities: store zeros (the caller masks it).
        return torch.where(valid.any(-2, keepdim=True), out, 0.0).to(keys.dtype)

    @abstractmethod
    def _summarize(self, keys: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """``(..., n, tokens, d)`` keys and ``(..., n, tokens, 1)`` validity (None: all valid) ->
        ``(..., n, rows, width)``."""

    def query(self, queries: torch.Tensor) -> torch.Tensor:
        """What multiplies the stored vectors: ``(..., head_dim)`` -> ``(..., width)``."""
        return queries

    def score(self, queries: torch.Tensor, summaries: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """``scale`` times the scores of ``n`` units: queries ``(batch, group, head_dim)`` and
        summaries ``(batch, n, rows, width)`` -> ``(batch, group, n)``. One batched matmul: every
        kind's score is positively homogeneous in the query, so the scale goes on the query."""
        batch, n = summaries.shape[0], summaries.shape[1]
        flat = summaries.reshape(batch, n * self.rows, summaries.shape[-1])
        factor = scale * self.query_scale
        s = torch.bmm(self.query(queries if factor == 1.0 else queries * factor).to(flat.dtype), flat.transpose(1, 2))
        return s if self.rows == 1 else s.unflatten(-1, (n, self.rows)).amax(-1)


class MeanSummary(Summary):
    """Mean key of the unit: score ``q . mean(k)``, the unit's average logit."""

    name = "mean"
    rows = 1

    def _summarize(self, keys: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        if valid is None:
            return keys.float().mean(-2, keepdim=True)
        count = valid.sum(-2, keepdim=True).clamp(min=1)
        return (keys.float() * valid).sum(-2, keepdim=True) / count


class MinMaxSummary(Summary):
    """Per-channel range of the keys (Quest), stored as one vector ``[hi + lo, hi - lo]``. The score
    ``sum_d max(q_d lo_d, q_d hi_d) = (q . (hi + lo) + |q| . (hi - lo)) / 2`` is an upper bound of
    ``q . k`` for every key of the unit, since each channel's product peaks at an end of its
    range; in this form it is one matmul of ``[q, |q|]`` (the 1/2 is ``query_scale``)."""

    name = "minmax"
    rows = 1
    query_scale = 0.5

    def width(self, head_dim: int) -> int:
        return 2 * head_dim

    def _summarize(self, keys: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        keys = keys.float()
        if valid is None:
            hi, lo = keys.amax(-2, keepdim=True), keys.amin(-2, keepdim=True)
        else:
            hi = keys.masked_fill(~valid, float("-inf")).amax(-2, keepdim=True)
            lo = keys.masked_fill(~valid, float("inf")).amin(-2, keepdim=True)
        return torch.cat([hi + lo, hi - lo], dim=-1)

    def query(self, queries: torch.Tensor) -> torch.Tensor:
        return torch.cat([queries, queries.abs()], dim=-1)


class LandmarkSummary(Summary):
    """``rows`` landmark keys per unit: the means of ``rows`` consecutive slices of it (ShadowKV's
    chunk landmarks). Score: the best landmark. With one landmark per token this is the unit's
    exact maximum logit."""

    name = "landmarks"

    def __init__(self, rows: int = 4) -> None:
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ConfigError(f"landmarks summary needs rows >= 1, got {rows!r}")
        self.rows = rows

    def _summarize(self, keys: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        tokens = keys.shape[-2]
        if valid is None:
            valid = torch.ones((*keys.shape[:-1], 1), dtype=torch.bool, device=keys.device)
        if tokens % self.rows:
            raise ShapeError(f"landmarks:{self.rows} needs units of a multiple of {self.rows} tokens, got {tokens}")
        slices = keys.float().unflatten(-2, (self.rows, tokens // self.rows))
        ok = valid.unflatten(-2, (self.rows, tokens // self.rows))
        count = ok.sum(-2).clamp(min=1)
        marks = (slices * ok).sum(-2) / count
        # A slice of padding only repeats the unit's mean, so it never outscores the real ones.
        mean = (keys.float() * valid).sum(-2, keepdim=True) / valid.sum(-2, keepdim=True).clamp(min=1)
        return torch.where(ok.any(-2), marks, mean)


def make_summary(spec: str) -> Summary:
    """Summary from its config name (``tiercache.config.parse_summary``)."""
    name, rows = parse_summary(spec)
    return {"mean": MeanSummary, "minmax": MinMaxSummary}[name]() if name != "landmarks" else LandmarkSummary(rows)
