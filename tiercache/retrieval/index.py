"""``UnitIndex``: every layer's unit summaries, per row of the batch, on the device.

The decode step scores a layer's units from ``data[layer][:, :, :n_units]`` with one matmul, so
the summaries of a row's units sit contiguous, in unit order: ``(rows, kv_heads, units_capacity,
summary.rows, width)`` per layer. ``bias[row, unit]`` is -inf when the unit holds padding only,
else 0; it is the same for every layer and is added to the unit's scores. Units sealed without
validity (no padding: the decode step's case) keep bias 0 and skip the masking. Capacity
doubles as the context grows, so sealing a unit is amortised O(1).
"""

from __future__ import annotations

import torch

from ..capacity import grown
from ..errors import ShapeError
from .summaries import Summary


class UnitIndex:
    """Summaries of ``layers`` layers' units of ``unit_tokens`` tokens for ``rows`` rows."""

    def __init__(self, summary: Summary, layers: int, rows: int, kv_heads: int, head_dim: int,
                 unit_tokens: int, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.summary = summary
        self.unit_tokens = unit_tokens
        self.kv_heads, self.head_dim = kv_heads, head_dim
        shape = (rows, kv_heads, 0, summary.rows, summary.width(head_dim))
        self.data = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.bias = torch.zeros((rows, 0), device=device)

    @property
    def rows(self) -> int:
        return self.bias.shape[0]

    def seal(self, layer: int, first: int, keys: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Summarise units ``first, first + 1, ...`` of ``layer`` from their post-RoPE keys ``(rows,
        kv_heads, n * unit_tokens, head_dim)`` and token validity ``(rows, n * unit_tokens)``
        (None: every token is valid)."""
        rows, heads, tokens, dim = keys.shape
        if (rows, heads, dim) != (self.rows, self.kv_heads, self.head_dim) or tokens % self.unit_tokens:
            raise ShapeError(f"unit index: keys {tuple(keys.shape)} are not (rows={self.rows}, kv_heads="
                             f"{self.kv_heads}, a multiple of {self.unit_tokens} tokens, head_dim={self.head_dim})")
        n = tokens // self.unit_tokens
        self._reserve(first + n)
        units = None if valid is None else valid.view(rows, n, self.unit_tokens)
        summaries = self.summary.summarize(keys.view(rows, heads, n, self.unit_tokens, dim),
                                           None if units is None else units.unsqueeze(1))
        self.data[layer][:, :, first : first + n] = summaries
        if units is not None:
            self.bias[:, first : first + n] = torch.where(units.any(-1), 0.0, float("-inf"))

    def cut(self, units: int) -> None:
        """Forget every unit from ``units`` on."""
        self.bias[:, units:] = 0.0

    def reorder(self, index: torch.Tensor) -> None:
        """Row ``r`` becomes old row ``index[r]`` (beam search)."""
        self.data = [d[index] for d in self.data]
        self.bias = self.bias[index]

    def _reserve(self, units: int) -> None:
        if units <= self.bias.shape[1]:
            return
        self.data = [grown(d, 2, units) for d in self.data]
        self.bias = grown(self.bias, 1, units)
