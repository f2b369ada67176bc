"""Approximate search of block summaries with faiss (RetrievalAttention-style), for contexts whose
blocks are too many to score each step.

One faiss index per KV head holds every summary row (a block contributes ``summary.rows`` rows).
faiss proposes candidate blocks per query head (and for the group's summed query); the candidates
are then re-scored exactly from a host copy of their summaries, so GQA aggregation and the
summary's own score stay exact and only the candidate set is approximate (the "softmax" aggregate
normalises over the candidates). Removal leaves tombstones (HNSW cannot delete) that are filtered
out of results; the faiss indexes are rebuilt once tombstones outnumber live rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import ConfigError
from .index import ExactIndex
from .summaries import Summary


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a dependency
        raise ConfigError("faiss index backends need the package faiss-cpu (or faiss-gpu)") from exc
    return faiss


class FaissIndex(ExactIndex):
    """faiss ANN candidates + exact re-scoring; see the module docstring.

    ``factory`` is a faiss factory string with optional search parameters after ``|``
    (``"IVF256,Flat|nprobe=16"``, ``"HNSW32|efSearch=64"``). Rows are added to faiss lazily, at
    the next search. An index that needs training (IVF) is trained on the rows present once there
    are ``39 * nlist`` of them; until then searches are exact.
    """

    def __init__(
        self, summary: Summary, kv_heads: int, head_dim: int, factory: str, gpu: bool = False
    ) -> None:
        if not summary.inner_product:
            raise ConfigError(
                f"faiss indexes search inner products; summary {summary.name!r} is not one "
                "(use 'mean' or 'landmarks', or index 'exact')"
            )
        super().__init__(summary, kv_heads, head_dim, device="cpu")
        self._faiss = _faiss()
        self._factory, _, self._params = factory.partition("|")
        if gpu and not hasattr(self._faiss, "StandardGpuResources"):
            raise ConfigError("index 'faiss-gpu:...' needs a faiss build with GPU support (faiss-gpu)")
        self._gpu = self._faiss.StandardGpuResources() if gpu else None
        self._reset()
        self._position = np.full(0, -1, dtype=np.int64)  # block index -> position in ExactIndex order
        self._end = 0  # 1 + the largest block index ever added

    def _new_faiss_index(self):
        faiss = self._faiss
        try:
            index = faiss.index_factory(self.head_dim, self._factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise ConfigError(f"bad faiss factory string {self._factory!r}: {exc}") from exc
        if self._gpu is not None:  # pragma: no cover - no GPU faiss in CI
            index = faiss.index_cpu_to_gpu(self._gpu, 0, index)
        self._apply(index, self._params)
        return index

    def _apply(self, index, params: str) -> None:
        if params:
            try:
                self._faiss.ParameterSpace().set_index_parameters(index, params)
            except RuntimeError as exc:
                raise ConfigError(f"bad faiss search parameters {params!r}: {exc}") from exc

    def tune(self, params: str) -> None:
        """Change the search parameters (faiss ``ParameterSpace`` syntax, e.g. ``"nprobe=32"`` or
        ``"efSearch=128"``) without rebuilding."""
        for index in self._indexes:
            self._apply(index, params)
        self._params = params

    def _reset(self) -> None:
        """Empty faiss indexes; every held block pending."""
        self._indexes = [self._new_faiss_index() for _ in range(self.kv_heads)]
        self._row_block = np.zeros(0, dtype=np.int64)  # faiss row id -> block index
        self._pending = [int(b) for b in self.block_ids()]
        self._dead = 0

    def _min_train(self) -> int:
        try:
            return 39 * self._faiss.extract_index_ivf(self._indexes[0]).nlist
        except RuntimeError:
            return 0

    def _added(self, n: int) -> None:
        new = self.block_ids()[-n:].numpy()
        top = int(new.max()) + 1
        self._end = max(self._end, top)
        if top > self._position.size:
            grown = np.full(max(top, 2 * self._position.size), -1, dtype=np.int64)
            grown[: self._position.size] = self._position
            self._position = grown
        self._position[new] = np.arange(len(self) - n, len(self))
        self._pending.extend(new.tolist())

    def remove(self, blocks: Sequence[int]) -> None:
        super().remove(blocks)
        gone = {int(b) for b in blocks}
        self._position[:] = -1
        self._position[self.block_ids().numpy()] = np.arange(len(self))
        before = len(self._pending)
        self._pending = [b for b in self._pending if b not in gone]
        self._dead += self.summary.rows * (len(gone) - (before - len(self._pending)))
        if self._dead > self._row_block.size - self._dead:
            self._reset()

    def sync(self) -> bool:
        """Push the rows added since the last search into faiss now (searches do it otherwise);
        False while the faiss index cannot be searched yet (IVF not trained)."""
        if not self._pending:
            return self._indexes[0].is_trained
        pending = np.asarray(self._pending, dtype=np.int64)
        rows = self.summaries()[:, torch.from_numpy(self._position[pending])]  # (h, p, rows, d)
        rows = rows.reshape(self.kv_heads, -1, self.head_dim).float().numpy()
        if not self._indexes[0].is_trained:
            if self._row_block.size + rows.shape[1] < self._min_train():
                return False
            for index, data in zip(self._indexes, rows):
                index.train(np.ascontiguousarray(data))
        for index, data in zip(self._indexes, rows):
            index.add(np.ascontiguousarray(data))
        self._row_block = np.concatenate([self._row_block, np.repeat(pending, self.summary.rows)])
        self._pending = []
        return True

    def search(
        self, queries: torch.Tensor, k: int, how: str, scaling: float, eligible: tuple[int, int]
    ) -> torch.Tensor:
        if not self.sync():
            return super().search(queries, k, how, scaling, eligible)
        # Over-fetch so that k eligible live blocks survive the filtering of ineligible blocks
        # (sinks, window) and tombstones.
        # (at most eligible[0] blocks lie below the range, and at most end - eligible[1] above it)
        outside = eligible[0] + max(0, self._end - eligible[1])
        want = min(self._row_block.size, self.summary.rows * (k + outside) + self._dead)
        # Each query head proposes its best rows, and so does the group's summed query: for a
        # single-row summary its inner products are exactly the "sum" aggregate's scores.
        q = queries.float().cpu()
        q = torch.cat([q, q.sum(dim=1, keepdim=True)], dim=1).numpy()
        out = []
        for h, index in enumerate(self._indexes):
            _, rows = index.search(np.ascontiguousarray(q[h]), want)
            cand = np.unique(self._row_block[rows[rows >= 0]])
            cand = cand[(cand >= eligible[0]) & (cand < eligible[1])]
            cand = cand[self._position[cand] >= 0]
            pos = torch.from_numpy(self._position[cand])
            out.append(
                self._top(queries[h : h + 1], torch.from_numpy(cand), self.summaries()[h : h + 1, pos],
                          k, how, scaling, eligible)
            )
        return torch.cat(out).to(queries.device)
