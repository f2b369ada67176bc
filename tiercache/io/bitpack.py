"""Packing of 1/2/4/8-bit integer codes into bytes, little end first, along the last axis."""

from __future__ import annotations

import torch

from ..errors import ConfigError


def _per_byte(bits: int) -> int:
    if bits not in (1, 2, 4, 8):
        raise ConfigError(f"bit packing supports 1, 2, 4 or 8 bits per code, got {bits}")
    return 8 // bits


def packed_nbytes(n_codes: int, bits: int) -> int:
    """Bytes taken by ``n_codes`` codes of ``bits`` bits (the last byte zero-padded)."""
    per = _per_byte(bits)
    return -(-n_codes // per)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 ``codes`` ``(..., n)`` each < ``2**bits`` into ``(..., packed_nbytes(n, bits))`` uint8."""
    per = _per_byte(bits)
    if per == 1:
        return codes
    n = codes.shape[-1]
    pad = packed_nbytes(n, bits) * per - n
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    grouped = codes.reshape(*codes.shape[:-1], -1, per).to(torch.int32)
    shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.int32)
    return (grouped << shifts).sum(dim=-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """Inverse of ``pack``: ``(..., packed_nbytes(n_codes, bits))`` uint8 to ``(..., n_codes)`` uint8."""
    per = _per_byte(bits)
    if per == 1:
        return packed[..., :n_codes]
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
    mask = (1 << bits) - 1
    codes = (packed.unsqueeze(-1) >> shifts) & mask
    return codes.reshape(*packed.shape[:-1], -1)[..., :n_codes]
