"""What a windowed layer attends (``tiercache.spec.Window``): sliding layers the last ``tokens``
positions, chunked layers (Llama 4) the positions of their chunk up to their own. Positions
count padding, as transformers' masks do.

A windowed layer reads every block its window touches (``blocks``) and masks the positions before
each query's first (``lower``); older blocks are never read again (they stay in the slower tiers,
so a crop can move back).
"""

from __future__ import annotations

import torch

from ..spec import Window
from .table import BlockTable


class Windows:
    """The windows of a model's layers (``windows[layer]``: a ``Window`` or None), read in blocks of
    ``block_tokens`` tokens on ``device``."""

    def __init__(self, windows: tuple[Window | None, ...], block_tokens: int, device: torch.device) -> None:
        self.windows = windows
        self.block_tokens = block_tokens
        self._ar = torch.arange(256, device=device)
        self._left_pad: torch.Tensor | None = None  # (rows, 1), kept from a prefill for its decode steps

    def __getitem__(self, layer: int) -> Window | None:
        return self.windows[layer]

    def forget_padding(self) -> None:
        """The rows changed (a reset, reorder or cut): the next forward counts their padding again."""
        self._left_pad = None

    def reorder(self, index: torch.Tensor) -> None:
        """Row ``r`` becomes old row ``index[r]``."""
        if self._left_pad is not None:
            self._left_pad = self._left_pad[index]

    def blocks(self, layer: int, first_query: int, last_key: int, rows: int) -> torch.Tensor:
        """The blocks ``(rows, n)`` windowed layer ``layer`` reads for queries from position
        ``first_query`` on, over the cached keys up to position ``last_key``: every block the
        window of ``first_query`` touches (``lower`` masks what precedes each query's window)."""
        bt = self.block_tokens
        first = max(0, first_query - self.windows[layer].tokens + 1)
        return self.arange(first // bt, last_key // bt + 1).expand(rows, -1)

    def read_tokens(self, layer: int, position: int) -> int:
        """Tokens a decode step at ``position`` attends in windowed layer ``layer``."""
        return min(self.windows[layer].tokens, position + 1)

    def lower(self, layer: int, first_query: int, n: int, valid: torch.Tensor | None,
              table: BlockTable) -> torch.Tensor:
        """The first position each of the queries at ``first_query ... first_query + n - 1``
        attends in windowed layer ``layer``: ``(1, n)`` for a sliding window; ``(rows, n)`` for
        chunks, which start at each row's first real token, as transformers' chunked mask counts
        them (``valid``: which of the ``n`` new tokens are real; None: all)."""
        window = self.windows[layer]
        positions = self.arange(first_query, first_query + n)[None]
        if window.kind == "sliding":
            return positions - (window.tokens - 1)
        pad = self._left_padding(first_query, n, valid, table)
        return pad + torch.div(positions - pad, window.tokens, rounding_mode="floor") * window.tokens

    def _left_padding(self, past: int, new: int, valid: torch.Tensor | None, table: BlockTable) -> torch.Tensor:
        """``(rows, 1)``: each row's padding tokens before its first real one, over the ``past``
        cached tokens and the ``new`` ones (``valid``). Computed in a prefill and kept for the
        decode steps after it (their tokens are real, so it cannot change)."""
        if new == 1 and self._left_pad is not None:
            return self._left_pad
        ok = torch.cat([table.valid(0, past), torch.ones(table.rows, new, dtype=torch.bool, device=self._ar.device)
                        if valid is None else valid], dim=1)
        self._left_pad = (ok.cumsum(1) == 0).sum(1, keepdim=True)
        return self._left_pad

    def arange(self, start: int, stop: int) -> torch.Tensor:
        """``arange(start, stop)`` on the device, as a view of one range kept for every call."""
        if stop > self._ar.numel():
            self._ar = torch.arange(max(stop, 2 * self._ar.numel()), device=self._ar.device)
        return self._ar[start:stop]
