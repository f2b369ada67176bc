"""Block summaries: a few vectors per KV head that stand in for a block's keys when scoring.

Summaries are computed once, when a block is sealed, from its **post-RoPE** keys: transformers
rotates keys before they reach the cache, and decode attention compares the post-RoPE query with
exactly those cached keys, so a summary of the rotated keys bounds or approximates the very
logits attention will compute. (Pre-RoPE keys would need the query un-rotated per position, which
has no single answer for a block spanning many positions.)

Each summary kind turns a block's keys into ``rows`` vectors per KV head, ``(kv_heads, rows,
head_dim)``, and scores queries against a stack of them. Scores are in
logit units (``q . k``, before the softmax scale).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..errors import ConfigError, ShapeError


class Summary(ABC):
    """How a block is summarised and scored. Stateless; one instance serves every block."""

    name: str
    #: Vectors stored per block and KV head.
    rows: int
    #: True when a block's score is the max over its rows of ``q . row``: an inner-product ANN
    #: index (faiss) can then search the rows directly.
    inner_product: bool

    def summarize(self, keys: torch.Tensor, block_tokens: int | None = None) -> torch.Tensor:
        """Summaries of consecutive blocks of post-RoPE keys ``(kv_heads, tokens, head_dim)``.

        The keys are cut into blocks of ``block_tokens`` tokens (``None``: one block of all of
        them; the last block may be partial). Returns ``(n_blocks, kv_heads, rows, head_dim)`` in
        the keys' dtype and device.
        """
        if not isinstance(keys, torch.Tensor) or keys.dim() != 3 or keys.shape[1] < 1:
            shape = tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__
            raise ShapeError(
                f"{self.name} summary: keys must be (kv_heads, tokens>=1, head_dim), got {shape}"
            )
        if not keys.is_floating_point():
            raise ShapeError(f"{self.name} summary: keys must be floating point, got {keys.dtype}")
        kv_heads, tokens, head_dim = keys.shape
        bt = block_tokens or tokens
        whole = tokens // bt * bt
        parts = []
        if whole:
            parts.append(self._summarize(keys[:, :whole].reshape(kv_heads, whole // bt, bt, head_dim)))
        if whole < tokens:
            parts.append(self._summarize(keys[:, whole:].unsqueeze(1)))
        return torch.cat(parts, dim=1).transpose(0, 1)

    @abstractmethod
    def _summarize(self, keys: torch.Tensor) -> torch.Tensor:
        """``(kv_heads, n, tokens, head_dim)`` -> ``(kv_heads, n, rows, head_dim)``."""

    @abstractmethod
    def score(self, queries: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
        """Scores of ``n`` blocks: queries ``(kv_heads, group, head_dim)`` and stacked summaries
        ``(kv_heads, n, rows, head_dim)`` -> ``(kv_heads, group, n)``, in logit units."""


class MeanSummary(Summary):
    """Mean key of the block: score ``q . mean(k)``, the block's average logit."""

    name = "mean"
    rows = 1
    inner_product = True

    def _summarize(self, keys: torch.Tensor) -> torch.Tensor:
        return keys.mean(dim=-2, keepdim=True)

    def score(self, queries: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
        return torch.einsum("hgd,hnd->hgn", queries, summaries[:, :, 0])


class MinMaxSummary(Summary):
    """Per-channel min and max of the keys (Quest). Score ``sum_d max(q_d lo_d, q_d hi_d)``, an
    upper bound of ``q . k`` for every key of the block, since each channel's product is maximised
    at one end of the channel's range."""

    name = "minmax"
    rows = 2
    inner_product = False

    def _summarize(self, keys: torch.Tensor) -> torch.Tensor:
        return torch.stack((keys.amin(dim=-2), keys.amax(dim=-2)), dim=-2)

    def score(self, queries: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
        # max(q_d lo_d, q_d hi_d) is q_d hi_d where q_d >= 0 and q_d lo_d elsewhere: two matmuls
        # instead of an elementwise (group x blocks x dims) tensor.
        lo, hi = summaries[:, :, 0], summaries[:, :, 1]  # (h, n, d)
        return torch.einsum("hgd,hnd->hgn", queries.clamp(min=0), hi) + torch.einsum(
            "hgd,hnd->hgn", queries.clamp(max=0), lo
        )


class LandmarkSummary(Summary):
    """``rows`` landmark keys per block: the means of ``rows`` consecutive slices of the block
    (ShadowKV's chunk landmarks). Score: the best landmark, ``max_r q . landmark_r``. With as many
    landmarks as tokens this is the block's exact maximum logit."""

    name = "landmarks"
    inner_product = True

    def __init__(self, rows: int = 4) -> None:
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ConfigError(f"landmarks summary needs rows >= 1, got {rows!r}")
        self.rows = rows

    def _summarize(self, keys: torch.Tensor) -> torch.Tensor:
        # A partial block with fewer tokens than landmarks repeats its last key, so every block
        # stores the same number of rows.
        slices = torch.tensor_split(keys, min(self.rows, keys.shape[-2]), dim=-2)
        marks = [s.mean(dim=-2) for s in slices]
        marks += [marks[-1]] * (self.rows - len(marks))
        return torch.stack(marks, dim=-2)

    def score(self, queries: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
        return torch.einsum("hgd,hnrd->hgnr", queries, summaries).amax(-1)


def make_summary(spec: str) -> Summary:
    """Summary from its config name: ``"mean"``, ``"minmax"``, ``"landmarks"`` (4 rows) or
    ``"landmarks:R"`` (R rows)."""
    name, _, arg = spec.partition(":")
    if name == "mean" and not arg:
        return MeanSummary()
    if name == "minmax" and not arg:
        return MinMaxSummary()
    if name == "landmarks":
        try:
            return LandmarkSummary(int(arg) if arg else 4)
        except ValueError:
            pass
    raise ConfigError(
        f"unknown summary {spec!r}; use 'mean', 'minmax', 'landmarks' or 'landmarks:R' (R per block)"
    )
