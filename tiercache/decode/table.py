"""``BlockTable``: which physical block holds each block of each sequence, and which tokens exist.

A batch's sequences are the table's *rows*; they advance in lockstep (a padded batch has one
length, the padding is marked invalid), so every row has the same number of tokens and blocks.
Block ``i`` of row ``r`` holds tokens ``[i * block_tokens, (i + 1) * block_tokens)`` and is
physical block ``pids[r, i]``; a physical block id (*pid*) names the same position in every
layer, and the ``TierManager`` keeps each (layer, pid)'s bytes. Rows may share pids (beams
forked from one prompt share its blocks); a pid is freed when no row holds it.

Device tensors, read by the decode step without any host sync:
- ``pids``: ``(rows, blocks_capacity)`` int64, -1 past the last block;
- ``bias``: ``(rows, tokens_capacity)`` in the KV dtype, 0 where a token was written and is not
  padding, -inf elsewhere: added to attention scores as it is, so masking costs no conversion.

The host keeps a numpy copy of ``pids`` and the pids' reference counts: they change only when a
block is opened, or rows are reordered or cut, never inside a decode step's tensor pipeline.
"""

from __future__ import annotations

import numpy as np
import torch

from ..capacity import grown
from ..errors import ShapeError


class BlockTable:
    """Rows of ``block_tokens``-token blocks on ``device`` (module docstring)."""

    def __init__(self, rows: int, block_tokens: int, device: torch.device, dtype: torch.dtype) -> None:
        self.rows = rows
        self.block_tokens = block_tokens
        self.device = device
        self.tokens = 0  # tokens of every row, padding included
        self._pids = np.full((rows, 0), -1, dtype=np.int64)
        self.pids = torch.full((rows, 0), -1, dtype=torch.int64, device=device)
        self.bias = torch.full((rows, 0), float("-inf"), dtype=dtype, device=device)
        self._zero = torch.zeros((), dtype=dtype, device=device)
        self._minus_inf = torch.full((), float("-inf"), dtype=dtype, device=device)
        self._refs = np.zeros(0, dtype=np.int64)
        self._free_pids: list[int] = []

    # ------------------------------------------------------------------ queries

    @property
    def blocks(self) -> int:
        """Blocks of every row (the last may be partial)."""
        return -(-self.tokens // self.block_tokens)

    @property
    def pid_capacity(self) -> int:
        """Pids are below this."""
        return len(self._refs)

    def host_pids(self, blocks: slice | int = slice(None)) -> np.ndarray:
        """The host copy of ``pids[:, blocks]``."""
        return self._pids[:, blocks]

    def live_pids(self) -> np.ndarray:
        """Every pid some row holds, ascending."""
        return np.flatnonzero(self._refs > 0)

    def refs(self, pids: np.ndarray) -> np.ndarray:
        """How many (row, block) entries hold each of ``pids``."""
        return self._refs[pids]

    # ------------------------------------------------------------------ growth

    def valid(self, start: int, stop: int) -> torch.Tensor:
        """``(rows, stop - start)`` bool: which of those tokens are real (written, not padding)."""
        return self.bias[:, start:stop] == 0

    def extend(self, tokens: int, valid: torch.Tensor | None = None) -> np.ndarray:
        """Grow every row to ``tokens`` tokens; ``valid`` ``(rows, new tokens)`` marks which new
        ones are real (None: all). New blocks get fresh pids; returns them ``(rows, new_blocks)``."""
        if tokens < self.tokens:
            raise ShapeError(f"block table: cannot extend {self.tokens} tokens to {tokens}")
        old, new = self.blocks, -(-tokens // self.block_tokens)
        if tokens > self.bias.shape[1]:
            # Whole blocks of tokens, so the decode step can view it as (rows, blocks, block_tokens).
            self.bias = grown(self.bias, 1, tokens, float("-inf"), self.block_tokens)
        self.bias[:, self.tokens : tokens] = self._zero if valid is None else torch.where(
            valid, self._zero, self._minus_inf)
        self.tokens = tokens
        if new == old:
            return np.zeros((self.rows, 0), dtype=np.int64)
        if new > self._pids.shape[1]:
            cap = max(new, 2 * self._pids.shape[1], 16)
            pids = np.full((self.rows, cap), -1, dtype=np.int64)
            pids[:, :old] = self._pids[:, :old]
            self._pids = pids
        fresh = self._take_pids(self.rows * (new - old)).reshape(self.rows, new - old)
        self._pids[:, old:new] = fresh
        self._upload()
        return fresh

    def _take_pids(self, n: int) -> np.ndarray:
        while len(self._free_pids) < n:
            start = len(self._refs)
            grow = max(n, start, 64)
            self._refs = np.concatenate([self._refs, np.zeros(grow, dtype=np.int64)])
            self._free_pids.extend(range(start + grow - 1, start - 1, -1))
        out = np.array([self._free_pids.pop() for _ in range(n)], dtype=np.int64)
        self._refs[out] += 1
        return out

    def _upload(self) -> None:
        self.pids = torch.from_numpy(self._pids).to(self.device)

    # ------------------------------------------------------------------ rewriting rows

    def cut(self, tokens: int) -> np.ndarray:
        """Forget every token past the first ``tokens`` of every row; returns the pids no row
        holds any more (their storage is the caller's to free)."""
        if not 0 <= tokens <= self.tokens:
            raise ShapeError(f"block table: cannot cut {self.tokens} tokens to {tokens}")
        keep = -(-tokens // self.block_tokens)
        gone = self._pids[:, keep : self.blocks].reshape(-1).copy()
        self._pids[:, keep:] = -1
        self.bias[:, tokens:] = float("-inf")
        self.tokens = tokens
        self._upload()
        return self._release(gone)

    def reorder(self, index: np.ndarray) -> np.ndarray:
        """Make row ``r`` a copy of old row ``index[r]`` (beam search; ``len(index)`` may differ
        from the number of rows). Blocks are shared, not copied. Returns the pids no row holds
        any more."""
        index = np.asarray(index, dtype=np.int64)
        if index.ndim != 1 or (index.size and (index.min() < 0 or index.max() >= self.rows)):
            raise ShapeError(f"block table: row index {index.tolist()} out of range for {self.rows} rows")
        before = self._pids[:, : self.blocks]
        after = before[index]
        np.add.at(self._refs, after[after >= 0], 1)
        gone = self._release(before.reshape(-1))
        self._pids = self._pids[index].copy()
        self.rows = len(index)
        self.bias = self.bias[torch.from_numpy(index).to(self.device)]
        self._upload()
        return gone

    def replace(self, row: int, block: int) -> int:
        """Give row ``row``'s block ``block`` a fresh pid (copy-on-write of a shared block);
        returns it. The old pid keeps its other holders."""
        old = int(self._pids[row, block])
        self._refs[old] -= 1
        new = int(self._take_pids(1)[0])
        self._pids[row, block] = new
        self._upload()
        return new

    def clear(self) -> np.ndarray:
        """Forget every row's tokens; returns the pids that were held."""
        return self.cut(0)

    def _release(self, pids: np.ndarray) -> np.ndarray:
        pids = pids[pids >= 0]
        np.subtract.at(self._refs, pids, 1)
        dead = np.unique(pids[self._refs[pids] == 0])
        self._free_pids.extend(dead[::-1].tolist())
        return dead
