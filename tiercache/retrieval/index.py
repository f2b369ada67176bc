"""Indexes of block summaries: one per (sequence, layer), searched once per decode step.

An index maps block indices (the block's position in its layer, ``BlockKey.index``) to summaries
and answers "which ``k`` blocks score highest for these queries", separately for each KV head.
Backends are picked by a spec string (see ``make_index``): ``"exact"`` scores every block with a
matmul on the compute device; ``"faiss:<factory>"`` searches an approximate faiss index on the host
(``tiercache.retrieval.faiss_index``) for contexts too long to scan.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from ..errors import BlockNotFoundError, ConfigError, ShapeError
from .summaries import Summary

AGGREGATES = ("max", "sum", "softmax")


def aggregate(scores: torch.Tensor, how: str, scaling: float) -> torch.Tensor:
    """Combine the scores of the query heads sharing a KV head (GQA): ``(kv_heads, group, n)`` ->
    ``(kv_heads, n)``.

    ``"max"``: the best logit over the group; ``"sum"``: the summed logits; ``"softmax"``: the sum
    over the group of each query head's softmax over the ``n`` blocks (``scaling`` is the
    attention's softmax scale), i.e. each head's estimated attention share, so that one head with
    large logits cannot outvote the others.
    """
    if how == "max":
        return scores.amax(dim=1)
    if how == "sum":
        return scores.sum(dim=1)
    if how == "softmax":
        return torch.softmax(scores.float() * scaling, dim=-1).sum(dim=1)
    raise ConfigError(f"unknown GQA aggregate {how!r}; use one of {AGGREGATES}")


class Index(ABC):
    """Summaries of one (sequence, layer)'s sealed blocks.

    ``kv_heads`` x ``summary.rows`` vectors of ``head_dim`` per block. Block indices are ints >= 0
    in units of blocks; each block is added at most once (when it is sealed).
    """

    def __init__(self, summary: Summary, kv_heads: int, head_dim: int) -> None:
        self.summary = summary
        self.kv_heads = kv_heads
        self.head_dim = head_dim

    @abstractmethod
    def add(self, blocks: Sequence[int], summaries: torch.Tensor) -> None:
        """Add sealed blocks: ``n`` block indices, none already held, and their summaries
        ``(n, kv_heads, rows, head_dim)`` (``Summary.summarize``)."""

    @abstractmethod
    def remove(self, blocks: Sequence[int]) -> None:
        """Forget these blocks (dropped sequence, evicted stream prefix). Raises
        ``BlockNotFoundError`` for a block the index does not hold."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of blocks held."""

    @abstractmethod
    def search(
        self, queries: torch.Tensor, k: int, how: str, scaling: float, eligible: tuple[int, int]
    ) -> torch.Tensor:
        """The ``k`` best blocks per KV head with index in ``[eligible[0], eligible[1])``.

        ``queries``: ``(kv_heads, group, head_dim)``; the group's scores are combined by
        ``aggregate(.., how, scaling)``. Returns block indices ``(kv_heads, k)`` int64, best first;
        ``-1`` pads a head with fewer than ``k`` eligible blocks found.
        """

    def check_summaries(self, blocks: Sequence[int], summaries: torch.Tensor) -> None:
        """Raise ``ShapeError`` unless ``summaries`` is ``(len(blocks), kv_heads, rows, head_dim)``."""
        expected = (len(blocks), self.kv_heads, self.summary.rows, self.head_dim)
        if not isinstance(summaries, torch.Tensor) or tuple(summaries.shape) != expected:
            got = tuple(summaries.shape) if isinstance(summaries, torch.Tensor) else type(summaries).__name__
            raise ShapeError(
                f"{self.summary.name} index: summaries have shape {got}, expected "
                f"(blocks={expected[0]}, kv_heads={expected[1]}, rows={expected[2]}, head_dim={expected[3]})"
            )


class ExactIndex(Index):
    """Every block scored at every search: a matmul plus top-k on the compute device.

    Summaries live in one growing tensor ``(kv_heads, capacity, rows, head_dim)`` (capacity doubles
    when full, so adding a block is amortised O(1)), float32 by default whatever the KV dtype: they
    are small, and fp16 rounding could break the Quest bound.
    """

    def __init__(
        self, summary: Summary, kv_heads: int, head_dim: int, device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(summary, kv_heads, head_dim)
        self._data = torch.empty(kv_heads, 16, summary.rows, head_dim, device=device, dtype=dtype)
        self._ids = torch.empty(16, dtype=torch.int64, device=device)
        self._count = 0
        self._held: set[int] = set()

    def __len__(self) -> int:
        return self._count

    def block_ids(self) -> torch.Tensor:
        """Indices of the blocks held ``(n,)``, in the order they were added."""
        return self._ids[: self._count]

    def summaries(self) -> torch.Tensor:
        """Stored summaries ``(kv_heads, n, rows, head_dim)``, aligned with ``block_ids()``."""
        return self._data[:, : self._count]

    def add(self, blocks: Sequence[int], summaries: torch.Tensor) -> None:
        self.check_summaries(blocks, summaries)
        blocks = [int(b) for b in blocks]
        clash = [b for b in blocks if b < 0 or b in self._held]
        if clash or len(set(blocks)) != len(blocks):
            raise ShapeError(
                f"index: blocks must be new indices >= 0, got duplicates or negatives {clash or blocks}"
            )
        n, end = len(blocks), self._count + len(blocks)
        if end > self._ids.numel():
            cap = max(end, 2 * self._ids.numel())
            data = self._data.new_empty(self.kv_heads, cap, self.summary.rows, self.head_dim)
            data[:, : self._count] = self.summaries()
            ids = self._ids.new_empty(cap)
            ids[: self._count] = self.block_ids()
            self._data, self._ids = data, ids
        self._data[:, self._count : end] = summaries.transpose(0, 1).to(self._data)
        self._ids[self._count : end] = torch.tensor(blocks, dtype=torch.int64)
        self._count = end
        self._held.update(blocks)
        self._added(n)

    def _added(self, n: int) -> None:
        """Hook for subclasses that mirror the last ``n`` added rows elsewhere."""

    def remove(self, blocks: Sequence[int]) -> None:
        gone = {int(b) for b in blocks}
        missing = gone - self._held
        if missing:
            raise BlockNotFoundError(f"index: cannot remove blocks {sorted(missing)}: not in the index")
        gone_ids = torch.tensor(sorted(gone), dtype=torch.int64, device=self._ids.device)
        keep = ~torch.isin(self.block_ids(), gone_ids)
        kept = int(keep.sum())
        self._data[:, :kept] = self.summaries()[:, keep]
        self._ids[:kept] = self.block_ids()[keep]
        self._count = kept
        self._held -= gone

    def search(
        self, queries: torch.Tensor, k: int, how: str, scaling: float, eligible: tuple[int, int]
    ) -> torch.Tensor:
        return self._top(queries, self.block_ids(), self.summaries(), k, how, scaling, eligible)

    def _top(
        self, queries: torch.Tensor, ids: torch.Tensor, summaries: torch.Tensor, k: int, how: str,
        scaling: float, eligible: tuple[int, int],
    ) -> torch.Tensor:
        """Top ``k`` of the candidate blocks ``ids`` ``(n,)`` with ``summaries``
        ``(heads, n, rows, head_dim)``, for queries ``(heads, group, head_dim)``: ``(heads, k)``."""
        scores = aggregate(self.summary.score(queries.to(summaries), summaries), how, scaling)
        ok = (ids >= eligible[0]) & (ids < eligible[1])
        scores = scores.masked_fill(~ok, float("-inf"))
        take = min(k, ids.numel())
        best, pos = scores.topk(take, dim=-1)
        out = torch.full((queries.shape[0], k), -1, dtype=torch.int64, device=ids.device)
        out[:, :take] = torch.where(best > float("-inf"), ids[pos], -1)
        return out


def make_index(
    spec: str, summary: Summary, kv_heads: int, head_dim: int, device: torch.device | str = "cpu"
) -> Index:
    """Index from its config spec.

    - ``"exact"``: ``ExactIndex`` on ``device``.
    - ``"faiss:<factory>"`` (e.g. ``"faiss:Flat"``, ``"faiss:IVF256,Flat|nprobe=16"``,
      ``"faiss:HNSW32|efSearch=64"``): a faiss index built with ``faiss.index_factory`` on the host;
      text after ``|`` sets search parameters. ``"faiss-gpu:<factory>"`` puts it on the GPU (needs
      a faiss build with GPU support). Only for inner-product summaries (``mean``, ``landmarks``).
    """
    if spec == "exact":
        return ExactIndex(summary, kv_heads, head_dim, device)
    backend, _, factory = spec.partition(":")
    if backend in ("faiss", "faiss-gpu") and factory:
        from .faiss_index import FaissIndex

        return FaissIndex(summary, kv_heads, head_dim, factory, gpu=backend == "faiss-gpu")
    raise ConfigError(
        f"unknown index {spec!r}; use 'exact', 'faiss:<factory string>' or 'faiss-gpu:<factory string>'"
    )
