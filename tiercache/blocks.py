"""The block: the unit every layer of tiercache speaks.

A block holds ``block_tokens`` consecutive tokens of one layer of one sequence, for every KV head:
keys and values each of shape ``(kv_heads, block_tokens, head_dim)``. ``BlockKey`` names it,
and ``BlockLayout`` gives its geometry and size.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from .errors import ShapeError


class TierName(str, enum.Enum):
    """Where a block lives. Ordered from fastest to slowest."""

    DEVICE = "device"
    HOST = "host"
    DISK = "disk"
    REMOTE = "remote"


@dataclass(frozen=True, order=True, slots=True)
class BlockKey:
    """Identity of one block: sequence id, layer index, block index within the layer (all >= 0)."""

    seq: int
    layer: int
    index: int

    def __post_init__(self) -> None:
        for name in ("seq", "layer", "index"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ShapeError(f"BlockKey.{name} must be a non-negative int, got {value!r}")

    def __str__(self) -> str:
        return f"block(seq={self.seq}, layer={self.layer}, index={self.index})"


@dataclass(frozen=True, slots=True)
class BlockLayout:
    """Geometry of a block: ``kv_heads`` x ``block_tokens`` x ``head_dim`` elements of ``dtype``,
    once for keys and once for values."""

    kv_heads: int
    block_tokens: int
    head_dim: int
    dtype: torch.dtype = torch.float16

    def __post_init__(self) -> None:
        for name in ("kv_heads", "block_tokens", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ShapeError(f"BlockLayout.{name} must be a positive int, got {value!r}")
        if not self.dtype.is_floating_point:
            raise ShapeError(f"BlockLayout.dtype must be a floating dtype, got {self.dtype}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of the key (or value) tensor of a full block."""
        return (self.kv_heads, self.block_tokens, self.head_dim)

    @property
    def elements(self) -> int:
        """Number of elements in keys plus values of a full block."""
        return 2 * self.kv_heads * self.block_tokens * self.head_dim

    @property
    def nbytes(self) -> int:
        """Size in bytes of a full block's raw keys plus values."""
        return self.elements * self.dtype.itemsize

    def check(self, k: torch.Tensor, v: torch.Tensor, what: str = "block") -> int:
        """Validate a (possibly partial) block's tensors; return its number of tokens.

        Keys and values must both be ``(kv_heads, t, head_dim)`` with ``1 <= t <= block_tokens`` and
        this layout's dtype.
        """
        for name, t in (("keys", k), ("values", v)):
            if not isinstance(t, torch.Tensor):
                raise ShapeError(f"{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 3 or t.shape[0] != self.kv_heads or t.shape[2] != self.head_dim:
                raise ShapeError(
                    f"{what}: {name} have shape {tuple(t.shape)}, expected "
                    f"(kv_heads={self.kv_heads}, tokens, head_dim={self.head_dim})"
                )
            if t.dtype != self.dtype:
                raise ShapeError(f"{what}: {name} have dtype {t.dtype}, expected {self.dtype}")
        if k.shape != v.shape:
            raise ShapeError(f"{what}: keys {tuple(k.shape)} and values {tuple(v.shape)} differ in shape")
        tokens = k.shape[1]
        if not 1 <= tokens <= self.block_tokens:
            raise ShapeError(f"{what}: {tokens} tokens, expected 1..{self.block_tokens}")
        return tokens
