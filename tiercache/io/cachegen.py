"""The ``cachegen`` codec: uniform quantization + optional delta to an anchor token + rANS.

Per tensor (keys, then values), each ``(kv_heads, tokens, head_dim)``:

1. Optionally rotate each head's channels by an orthonormal Hadamard matrix (``rotate``).
2. Keys: subtract each channel's mean over the block (stored fp16); softmax ignores a constant
   shift of the logits, so these means cost little and remove the RoPE channels' offsets.
3. Divide by a step and round. The step is ``key_step`` (``value_step``) times the head's RMS,
   refined per channel or per token (``key_scale`` / ``value_scale``) by a factor stored as a u8
   code in eighths of an octave. A uniform step gives every element the same absolute error
   (``step/2``, the stated bound before fp16 rounding), and the entropy coder, not a fixed bit
   width, adapts the rate to each channel's spread: no range is wasted on outliers.
4. With ``anchor > 0``, every token except the first of each ``anchor``-token chunk is replaced by
   its symbol minus the chunk's first symbol. On one grid this is lossless on the symbols.
5. rANS-code the symbols per channel class (``tiercache.io.rans``), escapes kept beside.

Payload per tensor (little-endian): ``f16 centers[H*D]`` (keys only), ``f32 base_step[H]``,
``u8 step_codes[...]`` (per channel ``H*D``, per token ``H*T``, or none), ``u8 classes[H*D]``,
``u32 n_escapes``, ``u32 positions[n]``, ``i32 values[n]``, then the class coder's tables and
words. Every field is checked on decode; anything inconsistent raises ``CorruptBlockError``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..blocks import BlockLayout
from ..errors import ConfigError, CorruptBlockError, ShapeError
from .codec import Codec, check_payload, register_codec
from .rans import ClassCoder, check_classes, classify, half_width
from .wire import Reader, Writer

_SCALES = ("head", "channel", "token")
_TABLES = ("shared", "block")
#: Step refinements are coded as 2**((code - 128) / 8): eighth-octave resolution, 2**±16 range.
_STEP_RES = 8
#: Symbols beyond this magnitude mean the step is far too fine for the data's range.
_MAX_SYMBOL = 1 << 30


@functools.cache
def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


@dataclass(frozen=True)
class _Spec:
    """How one of the two tensors is coded."""

    step: float
    scale: str  # "head", "channel" or "token"
    center: bool


@register_codec("cachegen")
class CacheGenCodec(Codec):
    """Variable-size lossy codec (see module docstring).

    ``key_step`` / ``value_step``: quantization step as a fraction of the head's RMS (keys: of the
    deviation from the channel means; values: of the values), > 0. ``key_scale`` / ``value_scale``:
    refine the step per ``"channel"``, per ``"token"`` or not at all (``"head"``). ``rotate``:
    Hadamard-rotate head channels (head_dim must be a power of two). ``anchor``: delta chunk
    length in tokens, 0 for none. ``tables``: ``"shared"`` (Laplace tables, nothing stored) or
    ``"block"`` (histograms stored per block).
    """

    name = "cachegen"
    lossless = False

    def __init__(
        self,
        key_step: float = 0.05,
        value_step: float = 0.1,
        key_scale: str = "head",
        value_scale: str = "token",
        rotate: bool = False,
        anchor: int = 0,
        tables: str = "shared",
    ) -> None:
        for pname, step in (("key_step", key_step), ("value_step", value_step)):
            if isinstance(step, bool) or not isinstance(step, (int, float)) or not 1e-3 <= step <= 64:
                raise ConfigError(f"cachegen codec: {pname} must be a number in [0.001, 64], got {step!r}")
        for pname, scale in (("key_scale", key_scale), ("value_scale", value_scale)):
            if scale not in _SCALES:
                raise ConfigError(f"cachegen codec: {pname} must be one of {_SCALES}, got {scale!r}")
        if not isinstance(rotate, bool):
            raise ConfigError(f"cachegen codec: rotate must be a bool, got {rotate!r}")
        if isinstance(anchor, bool) or not isinstance(anchor, int) or anchor < 0:
            raise ConfigError(f"cachegen codec: anchor must be an int >= 0 (tokens), got {anchor!r}")
        if tables not in _TABLES:
            raise ConfigError(f"cachegen codec: tables must be one of {_TABLES}, got {tables!r}")
        self.key_step, self.value_step = float(key_step), float(value_step)
        self.key_scale, self.value_scale = key_scale, value_scale
        self.rotate, self.anchor, self.tables = rotate, anchor, tables
        self._specs = (_Spec(self.key_step, key_scale, True), _Spec(self.value_step, value_scale, False))
        self._coder = ClassCoder(tables)

    def params(self) -> dict[str, int | float | str]:
        return {
            "key_step": self.key_step,
            "value_step": self.value_step,
            "key_scale": self.key_scale,
            "value_scale": self.value_scale,
            "rotate": self.rotate,
            "anchor": self.anchor,
            "tables": self.tables,
        }

    # -- encode ---------------------------------------------------------------------------------

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if k.dim() != 3 or k.shape != v.shape or k.dtype != v.dtype or not k.dtype.is_floating_point:
            raise ShapeError(
                f"cachegen codec: keys {tuple(k.shape)} {k.dtype} and values {tuple(v.shape)} "
                f"{v.dtype} must both be floating (kv_heads, tokens, head_dim)"
            )
        if not (torch.isfinite(k).all() and torch.isfinite(v).all()):
            raise ShapeError("cachegen codec: keys or values contain inf or NaN")
        out = Writer()
        for x, spec in zip((k, v), self._specs):
            self._encode_tensor(self._rotated(x.float(), inverse=False), spec, out)
        return torch.frombuffer(bytearray(out.bytes()), dtype=torch.uint8).to(k.device)

    def _encode_tensor(self, x: torch.Tensor, spec: _Spec, out: Writer) -> None:
        heads, tokens, dim = x.shape
        if spec.center:
            center = x.mean(dim=1, keepdim=True).half().float()
            out.put(center.cpu().numpy(), "<f2")
            x = x - center
        base = x.pow(2).mean(dim=(1, 2)).sqrt() * spec.step
        base = torch.where(base > 0, base, torch.ones_like(base))
        out.put(base.cpu().numpy(), "<f4")
        codes = self._step_codes(x, base, spec)
        out.put(codes.cpu().numpy(), "u1")
        step = _steps(base, codes, spec.scale, tokens, dim)
        q = torch.round(x / step)
        if q.abs().max() > _MAX_SYMBOL:
            raise ShapeError(f"cachegen codec: data range too large for step {spec.step}")
        # Quantization ran on x's device; entropy coding runs on the CPU.
        rows = q.to(torch.int64).transpose(1, 2).reshape(heads * dim, tokens).cpu().numpy()
        rows = self._delta(rows, forward=True)
        classes = classify(rows)
        out.put(classes, "u1")
        limit = half_width(classes)[:, None]
        escape = (np.abs(rows) >= limit) & (limit > 0)
        positions = np.flatnonzero(escape)
        out.put_count(len(positions))
        out.put(positions, "<u4")
        out.put(rows.reshape(-1)[positions], "<i4")
        self._coder.encode(np.clip(rows, -limit, limit), classes, out)

    @staticmethod
    def _step_codes(x: torch.Tensor, base: torch.Tensor, spec: _Spec) -> torch.Tensor:
        """u8 codes of each channel's (or token's) step relative to the head's base step; empty
        for ``"head"``. The wanted step is ``spec.step`` times that channel's (token's) RMS."""
        if spec.scale == "head":
            return torch.empty(0, dtype=torch.uint8, device=x.device)
        rms = x.pow(2).mean(dim=1 if spec.scale == "channel" else 2).sqrt()
        relative = (rms * spec.step / base[:, None]).clamp_min(2.0**-17)
        code = torch.round(torch.log2(relative) * _STEP_RES) + 128
        return code.clamp(0, 255).to(torch.uint8).reshape(-1)

    def _delta(self, rows: np.ndarray, forward: bool) -> np.ndarray:
        """Replace each non-anchor symbol by its difference to its chunk's anchor (or undo it)."""
        if not self.anchor:
            return rows
        t = np.arange(rows.shape[1])
        anchor_of = (t // self.anchor) * self.anchor
        is_delta = anchor_of != t
        out = rows.copy()
        # Anchors are never changed, so the inverse can read them from ``out``.
        if forward:
            out[:, is_delta] -= rows[:, anchor_of[is_delta]]
        else:
            out[:, is_delta] += out[:, anchor_of[is_delta]]
        return out

    # -- decode ---------------------------------------------------------------------------------

    def decode(
        self, payload: torch.Tensor, layout: BlockLayout, tokens: int, device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        check_payload("cachegen", payload)
        if self.rotate and layout.head_dim & (layout.head_dim - 1):
            raise CorruptBlockError(
                f"cachegen payload: rotate needs a power-of-two head_dim, got {layout.head_dim}"
            )
        reader = Reader(payload.cpu().numpy().tobytes(), "cachegen payload")
        shape = (layout.kv_heads, tokens, layout.head_dim)
        k, v = (
            self._rotated(self._decode_tensor(reader, spec, shape, device), inverse=True)
            for spec in self._specs
        )
        reader.finish()
        return k.to(layout.dtype), v.to(layout.dtype)

    def _decode_tensor(
        self, reader: Reader, spec: _Spec, shape: tuple[int, int, int], device: torch.device | str
    ) -> torch.Tensor:
        """Entropy-decode one tensor on the CPU and dequantize it on ``device``; fp32 ``shape``."""
        heads, tokens, dim = shape
        center = (
            torch.from_numpy(reader.take(heads * dim, "<f2").astype(np.float32)).view(heads, 1, dim)
            if spec.center
            else torch.zeros(1)
        )
        base = torch.from_numpy(reader.take(heads, "<f4").astype(np.float32))
        if not (torch.isfinite(base).all() and (base > 0).all() and torch.isfinite(center).all()):
            raise CorruptBlockError("cachegen payload: non-finite or non-positive step or center")
        n_codes = {"head": 0, "channel": heads * dim, "token": heads * tokens}[spec.scale]
        codes = torch.from_numpy(reader.take(n_codes, "u1").copy())
        classes = reader.take(heads * dim, "u1")
        check_classes(classes)
        total = heads * dim * tokens
        n_esc = reader.take_count(total, "escape")
        positions = reader.take(n_esc, "<u4").astype(np.int64)
        values = reader.take(n_esc, "<i4").astype(np.int64)
        rows = self._coder.decode(reader, classes, tokens)
        _apply_escapes(rows, classes, positions, values)
        rows = self._delta(rows, forward=False)
        q = torch.from_numpy(rows).to(device).view(heads, dim, tokens).transpose(1, 2).float()
        x = q * _steps(base.to(device), codes.to(device), spec.scale, tokens, dim) + center.to(device)
        if not torch.isfinite(x).all():
            raise CorruptBlockError("cachegen payload: decodes to non-finite values")
        return x

    def _rotated(self, x: torch.Tensor, inverse: bool) -> torch.Tensor:
        if not self.rotate:
            return x
        dim = x.shape[-1]
        if dim & (dim - 1):
            raise ShapeError(f"cachegen codec: rotate needs a power-of-two head_dim, got {dim}")
        h = _hadamard(dim).to(x.device)
        return x @ (h.T if inverse else h)


def _steps(base: torch.Tensor, codes: torch.Tensor, scale: str, tokens: int, dim: int) -> torch.Tensor:
    """Quantization step broadcastable to ``(H, T, D)`` from the stored base steps and codes."""
    heads = base.shape[0]
    if scale == "head":
        return base.view(heads, 1, 1)
    factor = torch.exp2((codes.float() - 128) / _STEP_RES)
    if scale == "channel":
        return base.view(heads, 1, 1) * factor.view(heads, 1, dim)
    return base.view(heads, 1, 1) * factor.view(heads, tokens, 1)


def _apply_escapes(rows: np.ndarray, classes: np.ndarray, positions: np.ndarray, values: np.ndarray) -> None:
    """Put the escaped symbols back in place, checking they match the stream's escape markers."""
    limit = half_width(classes)[:, None]
    marked = np.flatnonzero((np.abs(rows) >= limit) & (limit > 0))
    if len(marked) != len(positions) or not np.array_equal(marked, positions):
        raise CorruptBlockError(
            f"cachegen payload: {len(positions)} escapes listed, the stream marks {len(marked)}"
        )
    flat = rows.reshape(-1)
    markers = flat[positions]
    if ((np.sign(values) != np.sign(markers)) | (np.abs(values) < np.abs(markers))).any():
        raise CorruptBlockError("cachegen payload: escape value inconsistent with its marker")
    flat[positions] = values
