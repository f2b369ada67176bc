"""The ``quant`` codec: KIVI-style asymmetric integer quantization with a fixed payload size.

Keys are quantized per channel (each channel of each head over groups of ``group_size`` tokens),
values per token (each token over groups of ``group_size`` channels); ``key_mode="token"`` makes
keys per-token too (the 8-bit per-token baseline). Each group stores a scale and a zero point in
the block's dtype; codes of 2 or 4 bits are bit-packed.

Payload of one block (bytes): packed key codes, packed value codes, key scales, key zeros,
value scales, value zeros. Groups that run past the block's tokens (or channels) are padded by
repeating the last element, which leaves min and max unchanged.

Error bound (per element, see ``error_bound``): ``|decoded - original| <= scale/2`` of its group,
plus the rounding of the stored zero, scale and output to the dtype:
``scale/2 + eps*(|zero| + |decoded| + L*scale) + L*tiny`` with ``L = 2**bits - 1``, ``eps`` the
dtype's machine epsilon (twice its unit roundoff) and ``tiny`` its smallest subnormal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..blocks import BlockLayout
from ..errors import ConfigError, CorruptBlockError, ShapeError
from ..kernels.quant import dequantize_rows, quantize_rows
from .bitpack import pack, packed_nbytes, unpack
from .codec import Codec, register_codec

_BITS = (2, 4, 8)
_KEY_MODES = ("channel", "token")


@dataclass(frozen=True)
class _Grouping:
    """How one tensor ``(n, H, T, D)`` is cut into quantization rows of ``group`` elements."""

    axis: int  # 2: groups run along tokens (per-channel); 3: along channels (per-token)
    group: int
    padded: tuple[int, int, int]  # (H, T, D) after padding the grouped axis

    @property
    def rows(self) -> int:
        h, t, d = self.padded
        return h * t * d // self.group

    def to_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, H, T, D)`` -> ``(n * rows, group)``, padding by repeating the last element."""
        pad = self.padded[self.axis - 1] - x.shape[self.axis]
        if pad:
            last = x.narrow(self.axis, x.shape[self.axis] - 1, 1)
            x = torch.cat([x, last.expand(*[pad if i == self.axis else -1 for i in range(4)])], dim=self.axis)
        n, h, t, d = x.shape
        if self.axis == 2:
            return x.reshape(n, h, t // self.group, self.group, d).transpose(3, 4).reshape(-1, self.group)
        return x.reshape(-1, self.group)

    def from_rows(self, rows: torch.Tensor, n: int, tokens: int, head_dim: int) -> torch.Tensor:
        """Inverse of ``to_rows``: ``(n * rows, group)`` -> ``(n, H, tokens, head_dim)``."""
        h, t, d = self.padded
        if self.axis == 2:
            x = rows.reshape(n, h, t // self.group, d, self.group).transpose(3, 4).reshape(n, h, t, d)
        else:
            x = rows.reshape(n, h, t, d)
        return x[:, :, :tokens, :head_dim]


@register_codec("quant")
class QuantCodec(Codec):
    """KIVI-style ``bits``-bit asymmetric quantization (see module docstring).

    ``bits``: 2, 4 or 8 bits per code. ``group_size``: elements per scale/zero pair (tokens for
    per-channel keys, channels for per-token keys and values). ``key_mode``: ``"channel"`` or
    ``"token"``.
    """

    name = "quant"
    lossless = False

    def __init__(self, bits: int = 4, group_size: int = 32, key_mode: str = "channel") -> None:
        if bits not in _BITS:
            raise ConfigError(f"quant codec: bits must be one of {_BITS}, got {bits!r}")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ConfigError(f"quant codec: group_size must be a positive int, got {group_size!r}")
        if key_mode not in _KEY_MODES:
            raise ConfigError(f"quant codec: key_mode must be one of {_KEY_MODES}, got {key_mode!r}")
        self.bits = bits
        self.group_size = group_size
        self.key_mode = key_mode

    def params(self) -> dict[str, int | float | str]:
        return {"bits": self.bits, "group_size": self.group_size, "key_mode": self.key_mode}

    # -- geometry -------------------------------------------------------------------------------

    def _groupings(self, kv_heads: int, tokens: int, head_dim: int) -> tuple[_Grouping, _Grouping]:
        def along(axis: int) -> _Grouping:
            length = tokens if axis == 2 else head_dim
            group = min(self.group_size, length)
            padded_len = -(-length // group) * group
            shape = [kv_heads, tokens, head_dim]
            shape[axis - 1] = padded_len
            return _Grouping(axis, group, tuple(shape))

        return along(2 if self.key_mode == "channel" else 3), along(3)

    def _sections(self, layout: BlockLayout, tokens: int) -> list[tuple[str, int]]:
        """Byte sizes of the payload's sections, in order."""
        gk, gv = self._groupings(layout.kv_heads, tokens, layout.head_dim)
        meta = layout.dtype.itemsize
        return [
            ("k_codes", packed_nbytes(gk.rows * gk.group, self.bits)),
            ("v_codes", packed_nbytes(gv.rows * gv.group, self.bits)),
            ("k_scale", gk.rows * meta),
            ("k_zero", gk.rows * meta),
            ("v_scale", gv.rows * meta),
            ("v_zero", gv.rows * meta),
        ]

    def fixed_nbytes(self, layout: BlockLayout, tokens: int) -> int:
        return sum(size for _, size in self._sections(layout, tokens))

    # -- encode / decode ------------------------------------------------------------------------

    def _encode_batch(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``k``, ``v``: ``(n, H, T, D)`` -> ``(n, fixed_nbytes)`` uint8."""
        n, h, t, d = k.shape
        if not k.dtype.is_floating_point:
            raise ShapeError(f"quant codec: keys must be floating point, got {k.dtype}")
        if not (torch.isfinite(k).all() and torch.isfinite(v).all()):
            raise ShapeError("quant codec: keys or values contain inf or NaN")
        parts: dict[str, torch.Tensor] = {}
        for tag, x, grouping in zip("kv", (k, v), self._groupings(h, t, d)):
            codes, scale, zero = quantize_rows(grouping.to_rows(x), self.bits, x.dtype)
            if not torch.isfinite(scale).all():
                raise ShapeError(f"quant codec: a group's range of {tag} overflows {x.dtype}")
            parts[f"{tag}_codes"] = pack(codes.reshape(n, -1), self.bits)
            parts[f"{tag}_scale"] = scale.reshape(n, -1).view(torch.uint8)
            parts[f"{tag}_zero"] = zero.reshape(n, -1).view(torch.uint8)
        order = ("k_codes", "v_codes", "k_scale", "k_zero", "v_scale", "v_zero")
        return torch.cat([parts[name] for name in order], dim=1)

    def _split(self, payloads: torch.Tensor, layout: BlockLayout, tokens: int) -> dict[str, torch.Tensor]:
        """Cut ``(n, fixed_nbytes)`` payloads into their sections, checking the size."""
        sections = self._sections(layout, tokens)
        expected = sum(size for _, size in sections)
        if payloads.dtype != torch.uint8 or payloads.dim() != 2 or payloads.shape[1] != expected:
            raise CorruptBlockError(
                f"quant payload has shape {tuple(payloads.shape)} of {payloads.dtype}, expected "
                f"(n, {expected}) uint8 for {tokens} tokens of {layout}"
            )
        out, at = {}, 0
        for name, size in sections:
            out[name] = payloads[:, at : at + size]
            at += size
        return out

    def _metadata(
        self, parts: dict[str, torch.Tensor], tag: str, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scale = parts[f"{tag}_scale"].reshape(-1).clone().view(dtype)
        zero = parts[f"{tag}_zero"].reshape(-1).clone().view(dtype)
        if not (torch.isfinite(scale).all() and torch.isfinite(zero).all() and (scale >= 0).all()):
            raise CorruptBlockError(f"quant payload: non-finite or negative {tag} scale/zero")
        return scale, zero

    def _decode_batch(
        self, payloads: torch.Tensor, layout: BlockLayout, tokens: int, device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        parts = self._split(payloads.to(device), layout, tokens)
        n = payloads.shape[0]
        out = []
        for tag, grouping in zip("kv", self._groupings(layout.kv_heads, tokens, layout.head_dim)):
            scale, zero = self._metadata(parts, tag, layout.dtype)
            codes = unpack(parts[f"{tag}_codes"], self.bits, grouping.rows * grouping.group)
            rows = dequantize_rows(codes.reshape(-1, grouping.group), scale, zero, layout.dtype)
            if not torch.isfinite(rows).all():
                raise CorruptBlockError(f"quant payload: {tag} decodes to non-finite values")
            out.append(grouping.from_rows(rows, n, tokens, layout.head_dim))
        return out[0], out[1]

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        _check_pair(k, v)
        return self._encode_batch(k.unsqueeze(0), v.unsqueeze(0))[0]

    def decode(
        self, payload: torch.Tensor, layout: BlockLayout, tokens: int, device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if payload.dim() != 1:
            raise CorruptBlockError(f"quant payload must be 1-D, got shape {tuple(payload.shape)}")
        k, v = self._decode_batch(payload.unsqueeze(0), layout, tokens, device)
        return k[0], v[0]

    def encode_many(self, kv: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
        if (
            kv.dim() != 5
            or kv.shape[1] != 2
            or tuple(kv.shape[2:]) != layout.shape
            or kv.dtype != layout.dtype
        ):
            raise ShapeError(
                f"quant encode_many: got {tuple(kv.shape)} {kv.dtype}, "
                f"expected (n, 2, {layout.shape}) {layout.dtype}"
            )
        if kv.shape[0] == 0:
            return torch.empty(
                0, self.fixed_nbytes(layout, layout.block_tokens), dtype=torch.uint8, device=kv.device
            )
        return self._encode_batch(kv[:, 0], kv[:, 1])

    def decode_many(
        self, payloads: torch.Tensor, layout: BlockLayout, device: torch.device | str
    ) -> torch.Tensor:
        if payloads.dim() != 2:
            raise CorruptBlockError(
                f"quant decode_many: payloads must be 2-D, got shape {tuple(payloads.shape)}"
            )
        if payloads.shape[0] == 0:
            return torch.empty((0, 2, *layout.shape), dtype=layout.dtype, device=device)
        k, v = self._decode_batch(payloads, layout, layout.block_tokens, device)
        return torch.stack([k, v], dim=1)

    # -- error bound ----------------------------------------------------------------------------

    def error_bound(
        self, payload: torch.Tensor, layout: BlockLayout, tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-element bound on ``|decoded - original|`` for keys and values of a payload, each
        ``(kv_heads, tokens, head_dim)`` fp32 (formula in the module docstring)."""
        parts = self._split(payload.reshape(1, -1), layout, tokens)
        decoded = self._decode_batch(payload.reshape(1, -1), layout, tokens, payload.device)
        info = torch.finfo(layout.dtype)
        levels = (1 << self.bits) - 1
        bounds = []
        for tag, grouping, x in zip("kv", self._groupings(layout.kv_heads, tokens, layout.head_dim), decoded):
            scale, zero = (
                m.float()[:, None].expand(-1, grouping.group)
                for m in self._metadata(parts, tag, layout.dtype)
            )
            per_row = (
                scale / 2
                + info.eps * (zero.abs() + levels * scale)
                + levels * info.smallest_normal * info.eps
            )
            b = grouping.from_rows(per_row, 1, tokens, layout.head_dim)[0]
            bounds.append(b + info.eps * x[0].float().abs())
        return bounds[0], bounds[1]


def _check_pair(k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("keys", k), ("values", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ShapeError(
                f"{name} must be a (kv_heads, tokens, head_dim) tensor, got "
                f"{getattr(t, 'shape', type(t).__name__)}"
            )
    if k.shape != v.shape or k.dtype != v.dtype:
        raise ShapeError(f"keys {tuple(k.shape)} {k.dtype} and values {tuple(v.shape)} {v.dtype} differ")
    if not k.dtype.is_floating_point:
        raise ShapeError(f"keys and values must be floating point, got {k.dtype}")
