"""The ``cachegen`` codec: uniform quantization weighted by sensitivity + rANS.

A block's keys and values are each ``(kv_heads, tokens, head_dim)``. The codec spends its bits
where the attention output is sensitive to them:

1. Sink tokens raw: the first ``sink_tokens`` tokens of a sequence (attention sinks: every later
   query gives them weight) are stored exactly, in the input dtype. The codec learns a block's
   position from ``encode_at`` (the disk tier passes it); ``encode`` alone codes every token.
2. Keys: subtract each channel's mean over the block (stored fp16); softmax ignores a constant
   shift of the logits, so these means cost little and remove the RoPE channels' offsets. The step
   of channel ``d`` is ``key_step`` times the head's RMS (of the deviations), times a per-channel
   factor proportional to ``1 / sqrt(w_d)``, normalised to geometric mean 1, where ``w_d`` is the
   mean square of the (uncentred) keys of RoPE pair ``(d, d + head_dim/2)``. Queries put their
   energy on the same pairs as keys, so this spends bits where ``q . k`` is sensitive: on
   SmolLM2 it cuts the keys' share of attention-output error by a quarter at equal rate.
3. Values: the step of each token is ``value_step`` times that token's RMS over the head's
   channels (equal relative error per token; small-norm tokens such as sinks get fine steps).
4. Recency: ``key_step`` and ``value_step`` are the steps of old tokens. When the caller knows
   where the sequence ends (``encode_at``'s ``end``: a context saved whole, to be continued by
   questions or generation), a token ``age`` tokens before the last one gets steps
   ``min(recency_max, max(1, age / recency_tokens) ** recency_exponent) / recency_max`` times
   those: down to ``1 / recency_max`` for the last ``recency_tokens`` tokens. Later queries give
   recent tokens most of their attention, so their errors dominate the attention output (KIVI
   keeps its last tokens in full precision for the same reason); on SmolLM2 this saves about 1.7
   bits per element at equal attention-output error. The cap keeps old tokens usable for layers
   that attend far back (uncapped, at 8K tokens the mean error was 2.4% and the worst layer's
   12.7%, against 1.0% and 3.3%). Blocks of a sequence that may still grow (``encode``, or
   ``encode_at`` without ``end``: the disk tier's evictions, which the device's recent window
   keeps away from the end) are coded at the old tokens' steps.
5. Divide by the step and round: every element's error is at most ``step/2`` (before rounding to
   the output dtype), and the entropy coder, not a fixed bit width, adapts the rate to each
   channel's spread. Symbols are rANS-coded per channel class with shared Laplace tables
   (``tiercache.io.rans``), escapes kept beside.

Step factors are u8 codes in eighths of an octave: factor ``2**((code - 128) / 8)``.

Payload (little-endian): ``u16 n_raw``, raw keys ``[H, n_raw, D]`` and raw values (input dtype),
then, if tokens remain, keys: ``f16 centers[H*D]``, ``f32 base_step[H]``, ``u8 step_codes[H*D]``,
``u8 token_codes[T']`` (each coded token's recency factor), ``u8 classes[H*D]``, ``u32 n_escapes``,
``u32 positions[n]``, ``i32 values[n]``, the class coder's stream; then values: the same without
centers and token codes, and with ``u8 step_codes[H*T']`` per token. Every field is checked on
decode; anything inconsistent raises ``CorruptBlockError``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..blocks import BlockLayout
from ..errors import ConfigError, CorruptBlockError, ShapeError
from .codec import Codec, check_payload, register_codec
from .rans import ClassCoder, check_classes, classify, half_width
from .wire import Reader, Writer

#: Step refinements are coded as 2**((code - 128) / 8): eighth-octave resolution, 2**±16 range.
_STEP_RES = 8
#: Symbols beyond this magnitude mean the step is far too fine for the data's range.
_MAX_SYMBOL = 1 << 30
#: Key channel weights below this fraction of the head's mean count as this fraction.
_MIN_WEIGHT = 2.0**-20
_MAX_SINK = 1024
_MAX_RECENCY = 1 << 20
#: Base steps must stay below this (so decoded values stay finite in fp32).
_MAX_BASE = 2.0**64


@register_codec("cachegen")
class CacheGenCodec(Codec):
    """Variable-size lossy codec (see module docstring).

    ``key_step`` / ``value_step``: quantization step of old tokens, as a fraction of the head's
    RMS (keys: of the deviation from the channel means, then weighted per channel) or of each
    token's RMS (values); in [0.001, 64]. ``sink_tokens``: tokens at the start of a sequence
    stored raw (0 to 1024). ``recency_tokens`` (1 to 2**20), ``recency_exponent`` (0 to 4, 0
    turns it off: every token at the old tokens' steps) and ``recency_max`` (1 to 2**15): how much
    finer the tokens near a saved context's end are coded (module docstring).

    Defaults, on SmolLM2's contexts saved whole: attention-output error under 1% (8-bit quality)
    at about 5.3 bits per element at 4K and 8K tokens; ``COMPACT``: under 3% at about 3.8 bits.
    Blocks without an ``end`` cost about 5.1 bits per element (3.6 with ``COMPACT``).
    """

    name = "cachegen"
    lossless = False
    #: Parameters of the compact setting (attention-output error about 3% on SmolLM2).
    COMPACT = {"key_step": 0.32, "value_step": 0.424}

    def __init__(self, key_step: float = 0.112, value_step: float = 0.152, sink_tokens: int = 4,
                 recency_tokens: int = 64, recency_exponent: float = 0.75, recency_max: float = 8.0) -> None:
        for pname, value, lo, hi in (("key_step", key_step, 1e-3, 64), ("value_step", value_step, 1e-3, 64),
                                     ("recency_exponent", recency_exponent, 0, 4), ("recency_max", recency_max, 1, 2**15)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise ConfigError(f"cachegen codec: {pname} must be a number in [{lo:g}, {hi:g}], got {value!r}")
        for pname, count, lo, hi in (("sink_tokens", sink_tokens, 0, _MAX_SINK),
                                     ("recency_tokens", recency_tokens, 1, _MAX_RECENCY)):
            if isinstance(count, bool) or not isinstance(count, int) or not lo <= count <= hi:
                raise ConfigError(f"cachegen codec: {pname} must be an int in [{lo}, {hi}], got {count!r}")
        self.key_step, self.value_step, self.sink_tokens = float(key_step), float(value_step), sink_tokens
        self.recency_tokens, self.recency_exponent = recency_tokens, float(recency_exponent)
        self.recency_max = float(recency_max)
        self._coder = ClassCoder("shared")

    def params(self) -> dict[str, int | float | str]:
        return {"key_step": self.key_step, "value_step": self.value_step, "sink_tokens": self.sink_tokens,
                "recency_tokens": self.recency_tokens, "recency_exponent": self.recency_exponent,
                "recency_max": self.recency_max}

    # -- encode ---------------------------------------------------------------------------------

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Code every token at the old tokens' steps (position unknown: no sink tokens raw)."""
        return self.encode_at(k, v, self.sink_tokens)

    def encode_at(self, k: torch.Tensor, v: torch.Tensor, position: int, end: int | None = None) -> torch.Tensor:
        """Code a block whose first token is at sequence position ``position`` (tokens); ``end``:
        the length in tokens of the whole sequence when it is final (tokens near it coded finer)."""
        if k.dim() != 3 or k.shape != v.shape or k.dtype != v.dtype or not k.dtype.is_floating_point:
            raise ShapeError(
                f"cachegen codec: keys {tuple(k.shape)} {k.dtype} and values {tuple(v.shape)} "
                f"{v.dtype} must both be floating (kv_heads, tokens, head_dim)"
            )
        if not (torch.isfinite(k).all() and torch.isfinite(v).all()):
            raise ShapeError("cachegen codec: keys or values contain inf or NaN")
        tokens = k.shape[1]
        n_raw = max(0, min(self.sink_tokens - position, tokens))
        age_codes = self._age_codes(position, tokens, end)[n_raw:].to(k.device)
        out = Writer()
        out.put(np.array([n_raw]), "<u2")
        for x in (k, v):
            out.put(x[:, :n_raw].contiguous().cpu().view(torch.uint8).numpy(), "u1")
        if n_raw < tokens:
            self._encode_keys(k[:, n_raw:].float(), age_codes, out)
            self._encode_values(v[:, n_raw:].float(), age_codes, out)
        return torch.frombuffer(bytearray(out.bytes()), dtype=torch.uint8).to(k.device)

    def _age_codes(self, position: int, tokens: int, end: int | None) -> torch.Tensor:
        """u8 step-factor codes ``(tokens,)`` of the recency rule (128: factor 1, old tokens)."""
        if end is None or self.recency_exponent == 0:
            return torch.full((tokens,), 128, dtype=torch.uint8)
        if isinstance(end, bool) or not isinstance(end, int) or end < position + tokens:
            raise ShapeError(
                f"cachegen codec: end={end!r} must be an int at least the block's end, "
                f"position {position} + {tokens} tokens"
            )
        age = (end - 1 - position - torch.arange(tokens)).double()
        cap = math.log2(self.recency_max)
        log_factor = (torch.log2((age / self.recency_tokens).clamp_min(1)) * self.recency_exponent).clamp_max(cap) - cap
        return (torch.round(log_factor * _STEP_RES) + 128).clamp(0, 255).to(torch.uint8)

    def _encode_keys(self, x: torch.Tensor, age_codes: torch.Tensor, out: Writer) -> None:
        heads, _, dim = x.shape
        weight = x.pow(2).mean(dim=1)  # (H, D), uncentred
        if dim % 2 == 0:
            weight = (weight + weight.roll(dim // 2, dims=1)) / 2
        center = x.mean(dim=1, keepdim=True).half().float()
        out.put(center.cpu().numpy(), "<f2")
        x = x - center
        base = _base_steps(x, self.key_step)
        out.put(base.cpu().numpy(), "<f4")
        rel = (weight / weight.mean(dim=1, keepdim=True).clamp_min(1e-30)).clamp_min(_MIN_WEIGHT)
        log_factor = -0.5 * torch.log2(rel)
        log_factor = log_factor - log_factor.mean(dim=1, keepdim=True)
        codes = (torch.round(log_factor * _STEP_RES) + 128).clamp(0, 255).to(torch.uint8)
        out.put(codes.cpu().numpy(), "u1")
        out.put(age_codes.cpu().numpy(), "u1")
        step = base.view(heads, 1, 1) * _factor(codes).view(heads, 1, dim) * _factor(age_codes).view(1, -1, 1)
        self._quantize(x, step, out)

    def _encode_values(self, x: torch.Tensor, age_codes: torch.Tensor, out: Writer) -> None:
        heads, tokens, _ = x.shape
        base = _base_steps(x, self.value_step)
        out.put(base.cpu().numpy(), "<f4")
        rms = x.pow(2).mean(dim=2).sqrt()
        relative = (rms * self.value_step * _factor(age_codes) / base[:, None]).clamp_min(2.0**-17)
        codes = (torch.round(torch.log2(relative) * _STEP_RES) + 128).clamp(0, 255).to(torch.uint8)
        out.put(codes.cpu().numpy(), "u1")
        self._quantize(x, base.view(heads, 1, 1) * _factor(codes).view(heads, tokens, 1), out)

    def _quantize(self, x: torch.Tensor, step: torch.Tensor, out: Writer) -> None:
        """Round ``x / step`` and write classes, escapes and the rANS stream, one row per channel."""
        heads, tokens, dim = x.shape
        q = torch.round(x / step)
        if q.abs().max() > _MAX_SYMBOL:
            raise ShapeError("cachegen codec: data range too large for the step")
        # Quantization ran on x's device; entropy coding runs on the CPU.
        rows = q.to(torch.int64).transpose(1, 2).reshape(heads * dim, tokens).cpu().numpy()
        classes = classify(rows)
        out.put(classes, "u1")
        limit = half_width(classes)[:, None]
        escape = (np.abs(rows) >= limit) & (limit > 0)
        positions = np.flatnonzero(escape)
        out.put_count(len(positions))
        out.put(positions, "<u4")
        out.put(rows.reshape(-1)[positions], "<i4")
        self._coder.encode(np.clip(rows, -limit, limit), classes, out)

    # -- decode ---------------------------------------------------------------------------------

    def decode(
        self, payload: torch.Tensor, layout: BlockLayout, tokens: int, device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        check_payload("cachegen", payload)
        reader = Reader(payload.cpu().numpy().tobytes(), "cachegen payload")
        heads, dim = layout.kv_heads, layout.head_dim
        n_raw = int(reader.take(1, "<u2")[0])
        if n_raw > min(self.sink_tokens, tokens):
            raise CorruptBlockError(
                f"cachegen payload: {n_raw} raw tokens, at most {min(self.sink_tokens, tokens)} allowed"
            )
        out = torch.empty((2, heads, tokens, dim), dtype=layout.dtype, device=device)
        for i in range(2):
            data = reader.take(heads * n_raw * dim * layout.dtype.itemsize, "u1")
            if n_raw:
                raw = torch.from_numpy(data.copy()).view(layout.dtype).view(heads, n_raw, dim)
                if not torch.isfinite(raw).all():
                    raise CorruptBlockError("cachegen payload: raw sink tokens are not finite")
                out[i, :, :n_raw] = raw
        if n_raw < tokens:
            rest = (heads, tokens - n_raw, dim)
            out[0, :, n_raw:] = self._decode_tensor(reader, rest, True, device)
            out[1, :, n_raw:] = self._decode_tensor(reader, rest, False, device)
        reader.finish()
        return out[0], out[1]

    def _decode_tensor(
        self, reader: Reader, shape: tuple[int, int, int], keys: bool, device: torch.device | str
    ) -> torch.Tensor:
        """Entropy-decode keys or values on the CPU and dequantize on ``device``; fp32 ``shape``."""
        heads, tokens, dim = shape
        center = reader.take(heads * dim, "<f2").astype(np.float32) if keys else np.zeros(1, np.float32)
        base = reader.take(heads, "<f4").astype(np.float32)
        # |symbol| < 2**31, factors <= 2**32 (channel times age) and base < 2**64 keep every decoded
        # value finite in fp32.
        if not (np.isfinite(center).all() and (base > 0).all() and (base < _MAX_BASE).all()):
            raise CorruptBlockError("cachegen payload: non-finite center, or step not in (0, 2**64)")
        codes = torch.from_numpy(reader.take(heads * (dim if keys else tokens), "u1").copy())
        age = torch.from_numpy(reader.take(tokens, "u1").copy()) if keys else None
        classes = reader.take(heads * dim, "u1")
        check_classes(classes)
        n_esc = reader.take_count(heads * dim * tokens, "escape")
        positions = reader.take(n_esc, "<u4").astype(np.int64)
        values = reader.take(n_esc, "<i4").astype(np.int64)
        rows = self._coder.decode(reader, classes, tokens)
        _apply_escapes(rows, classes, positions, values)
        q = torch.from_numpy(rows.astype(np.float32)).to(device).view(heads, dim, tokens).transpose(1, 2)
        factor = _factor(codes.to(device)).view((heads, 1, dim) if keys else (heads, tokens, 1))
        step = torch.from_numpy(base).to(device).view(heads, 1, 1) * factor
        if keys:
            step = step * _factor(age.to(device)).view(1, tokens, 1)
            return torch.addcmul(torch.from_numpy(center).to(device).view(heads, 1, dim), q, step)
        return q * step


def _base_steps(x: torch.Tensor, step: float) -> torch.Tensor:
    """``step`` times each head's RMS of ``x`` ``(H, T, D)``; 1 for an all-zero head."""
    base = x.pow(2).mean(dim=(1, 2)).sqrt() * step
    if (base >= _MAX_BASE).any():
        raise ShapeError(f"cachegen codec: data RMS too large (step {float(base.max()):.3g} >= 2**64)")
    return torch.where(base > 0, base, torch.ones_like(base))


def _factor(codes: torch.Tensor) -> torch.Tensor:
    """Step factors of u8 ``codes``: ``2**((code - 128) / 8)``."""
    return torch.exp2((codes.float() - 128) / _STEP_RES)


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
