"""The hot tier: ``DeviceSlab``, every layer's device slots in one tensor ``(layers, slots + 1,
block_tokens, 2, kv_heads, head_dim)`` allocated once; slot ``slots`` of each layer is a scratch slot that
  masked writes of the decode path land in, so a step never needs a data-dependent shape. The
  layout is token-major so that a gather of blocks views as keys ``(kv_heads, tokens,
  head_dim)`` without a copy; tiers below store blocks as ``(2, kv_heads, block_tokens,
  head_dim)`` (``BlockLayout``), and the copies between them permute.
"""

from __future__ import annotations

import torch

from ..blocks import BlockLayout


class DeviceSlab:
    """``slots`` block slots per layer on ``device``, plus one scratch slot per layer."""

    def __init__(self, layout: BlockLayout, layers: int, slots: int, device: torch.device) -> None:
        self.layout = layout
        self.slots = slots
        # Zeroed once so positions past a partial block's tokens never hold NaN bit patterns.
        self.kv = torch.zeros((layers, slots + 1, layout.block_tokens, 2, layout.kv_heads, layout.head_dim),
                              dtype=layout.dtype, device=device)

    @property
    def scratch(self) -> int:
        """Index of each layer's scratch slot."""
        return self.slots

    @property
    def capacity_bytes(self) -> int:
        """Bytes of the usable slots (the scratch slots excluded)."""
        return self.kv.shape[0] * self.slots * self.layout.nbytes
