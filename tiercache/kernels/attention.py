"""Attention over KV blocks read in place from the device slab, and the log-sum-exp merge.

``paged_attention(q, slab, slots, bias, scale)``: exact softmax attention of a batch's queries
over the blocks each row reads, addressed through the block table (``slots[row, i]`` is a slot of
one layer's slab ``(slots + 1, block_tokens, 2, kv_heads, head_dim)``), with ``bias[row, i, t]``
(0, or -inf for a token that does not exist or is padding) added to the scores; a prefill may
give each query its own bias ``bias[row, query, i, t]`` (a sliding window over the cached part).
Every key read precedes every query (decode, or a prefill's cached part), so there is no causal
mask here; ``causal_attention`` covers a prefill's own new tokens. Both return the log-sum-exp so
parts merge exactly with ``merge_attention``.

Semantics, every implementation:
- GQA: query head ``h`` reads KV head ``h // (q_heads // kv_heads)`` (transformers' order);
- softmax in fp32; output in ``q.dtype``; ``lse`` fp32 natural log of the scaled scores' sum;
- a query row with no valid key: zero output and ``lse = -inf`` (it weighs nothing in a merge);
- ``softcap`` (Gemma 2): scaled scores become ``softcap * tanh(score / softcap)`` before the bias,
  as transformers' eager attention does; only the ``"torch"`` implementation has it (``"auto"``
  picks it then).

Implementations (``impl``): ``"torch"`` is the reference, plain matmul and softmax, which defines
the results; ``"sdpa"`` runs torch's fused CPU flash-attention op on the same view of the slab
(one op instead of a dozen); ``"triton"`` is a flash-decoding kernel for CUDA that reads the
blocks in place through the slots (no gather copy; under ``TRITON_INTERPRET=1`` it runs on CPU
tensors, for tests). ``"auto"``: Triton on CUDA, SDPA on the CPU.
"""

from __future__ import annotations

import functools
import os

import torch

from ..errors import ConfigError, ShapeError

_IMPLS = ("auto", "torch", "sdpa", "triton")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Programs per SM the Triton decode kernel aims at (it splits each row's blocks to get there).
_PROGRAMS_PER_SM = 4


def paged_attention(q: torch.Tensor, slab: torch.Tensor, slots: torch.Tensor, bias: torch.Tensor,
                    scale: float, impl: str = "auto", lse: bool = True,
                    extra: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                    softcap: float | None = None, out_dtype: torch.dtype | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of ``q`` over the blocks in ``slots`` (module docstring).

    Args:
        q: ``(rows, q_heads, q_len, head_dim)``, RoPE applied.
        slab: one layer's slots ``(n_slots, block_tokens, 2, kv_heads, head_dim)``, q's dtype.
        slots: ``(rows, n_read)`` int64 slots each row reads.
        bias: ``(rows, n_read, block_tokens)`` in q's dtype: 0 for a token to attend, -inf not; or
            ``(rows, q_len, n_read, block_tokens)``, one per query (not with ``"triton"``).
        scale: factor on ``q . k`` before the softmax.
        impl: ``"auto"``, ``"torch"``, ``"sdpa"`` (CPU) or ``"triton"`` (CUDA, ``q_len == 1``).
        lse: also return the log-sum-exp (needed to merge parts); False returns None for it.
        extra: more keys and values ``(rows, kv_heads, m, head_dim)`` and their score bias ``(rows,
            m)``, attended in the same softmax by every query (the estimate of the blocks not read:
            ``tiercache.retrieval.estimate``); soft-capped like the others, the bias added after.
        softcap: soft-capping of the scaled scores (module docstring), or None.
        out_dtype: dtype of the output (None: q's). A part that will be merged with others asks
            for fp32, so that the merged result is rounded to q's dtype once, not once per part.

    Returns:
        ``(out, lse)``: ``(rows, q_heads, q_len, head_dim)`` in ``out_dtype`` and ``(rows, q_heads,
        q_len)`` fp32 (or None).
    """
    _check(q, slab, slots, bias, impl)
    per_query = bias.dim() == 4
    if impl == "auto":
        impl = "torch" if softcap is not None else (
            "triton" if q.is_cuda and q.shape[2] == 1 and not per_query and _triton() is not None else (
                "sdpa" if q.device.type == "cpu" else "torch"))
    _check_softcap(impl, softcap)
    if impl == "triton":
        if not ((q.is_cuda or interpreting()) and _triton() is not None and q.shape[2] == 1 and not per_query):
            raise ConfigError("paged_attention: impl='triton' needs Triton, CUDA tensors, q_len == 1 and one bias per "
                              f"row, got q {tuple(q.shape)} on {q.device}, bias {tuple(bias.shape)}")
        return _paged_triton(q, slab, slots, bias, float(scale), extra, out_dtype or q.dtype)
    rows, n_read = slots.shape
    bt, kv_heads, head_dim = slab.shape[1], slab.shape[3], slab.shape[4]
    # (rows, n_read, bt, 2, kv_heads, D) -> keys and values (rows, kv_heads, n_read * bt, D): a
    # gather, then views (the slab is token-major, so no copy).
    keys, values = slab.index_select(0, slots.reshape(-1)).view(rows, n_read * bt, 2, kv_heads, head_dim).unbind(2)
    keys, values = keys.transpose(1, 2), values.transpose(1, 2)
    if extra is not None:
        keys, values = torch.cat([keys, extra[0]], 2), torch.cat([values, extra[1]], 2)
    if per_query:  # (rows, q_len, tokens); the extra tokens' bias is the same for every query
        bias = bias.view(rows, q.shape[2], n_read * bt)
        if extra is not None:
            bias = torch.cat([bias, extra[2][:, None, :].expand(rows, q.shape[2], -1)], 2)
        bias = _query_rows(bias, q.shape[1] // kv_heads)
    else:  # the mask does not depend on the query row: (rows, 1, 1, tokens) broadcasts
        bias = bias.view(rows, -1) if extra is None else torch.cat([bias.view(rows, -1), extra[2]], 1)
        bias = bias.view(rows, 1, 1, -1)
    return _attend(q, keys, values, bias, float(scale), impl, lse, softcap, out_dtype)


def token_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, scale: float,
                    impl: str = "auto", lse: bool = True, softcap: float | None = None,
                    out_dtype: torch.dtype | None = None,
                    extra: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of ``q`` ``(rows, q_heads, q_len, head_dim)`` over tokens gathered per KV head:
    ``keys`` / ``values`` ``(rows, kv_heads, n, head_dim)`` with ``bias`` ``(rows, kv_heads, n)``
    (0 to attend, -inf not), every token preceding every query (token-granular retrieval reads
    its selection this way). ``extra``: more keys and values ``(rows * kv_heads, m, head_dim)`` and
    their score bias ``(rows * kv_heads, m)`` in the same softmax (the estimate of what a step
    does not read: a mean key whose bias is the log of the tokens it stands for). ``impl``
    ``"auto"`` / ``"sdpa"`` (CPU) / ``"torch"``; the rest and the returned ``(out, lse)`` as
    ``paged_attention``'s."""
    if impl == "auto":
        impl = "sdpa" if q.device.type == "cpu" and softcap is None else "torch"
    _check_softcap(impl, softcap)
    if extra is not None:
        rows, kv_heads, _, dim = keys.shape
        extra_keys, extra_values, extra_bias = (t.view(rows, kv_heads, *t.shape[1:]) for t in extra)
        keys = torch.cat([keys, extra_keys.to(keys.dtype)], 2)
        values = torch.cat([values, extra_values.to(values.dtype)], 2)
        bias = torch.cat([bias, extra_bias.to(bias.dtype)], 2)
    return _attend(q, keys, values, bias[:, :, None].to(q.dtype), float(scale), impl, lse, softcap, out_dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                     scale: float, impl: str = "auto", softcap: float | None = None,
                     out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of a prefill's new tokens over themselves: ``q`` ``(rows, q_heads, q_len,
    head_dim)`` are the last ``q_len`` of the ``n`` tokens of ``k`` / ``v`` ``(rows, kv_heads, n,
    head_dim)``; ``valid`` ``(rows, n)`` bool (False: padding, never attended), or ``(rows, q_len,
    n)``: the keys each query may attend (a window). ``out_dtype`` and the returned ``(out, lse)``
    as ``paged_attention``'s."""
    rows, q_heads, q_len, _ = q.shape
    n, group = k.shape[2], q_heads // k.shape[1]
    causal = torch.ones(q_len, n, dtype=torch.bool, device=q.device).tril(n - q_len)
    mask = causal & (valid[:, None, :] if valid.dim() == 2 else valid)       # (rows, q_len, n)
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    if impl == "auto":
        impl = "sdpa" if q.device.type == "cpu" and softcap is None else "torch"
    _check_softcap(impl, softcap)
    return _attend(q, k, v, _query_rows(bias, group), float(scale), impl, True, softcap, out_dtype)


def _query_rows(bias: torch.Tensor, group: int) -> torch.Tensor:
    """A per-query ``bias`` ``(rows, q_len, n)`` as ``_attend`` lays queries out, ``(rows, 1,
    group * q_len, n)``: each query head of a group is a block of query rows, so the rows' bias
    repeats per head."""
    rows, q_len, n = bias.shape
    return bias.unsqueeze(1).expand(rows, group, q_len, n).reshape(rows, 1, group * q_len, n)


def _check_softcap(impl: str, softcap: float | None) -> None:
    if softcap is not None and impl != "torch":
        raise ConfigError(f"attention with softcap={softcap} runs on impl='torch' only, got impl={impl!r}")


def _attend(q, keys, values, bias, scale, impl, lse, softcap=None, out_dtype=None):
    """``q`` ``(rows, q_heads, q_len, D)`` over ``keys`` / ``values`` ``(rows, kv_heads, n, D)``
    with the additive ``bias`` broadcastable to ``(rows, kv_heads, group * q_len, n)``; scores
    soft-capped by ``softcap`` if given (``"torch"`` only); the output in ``out_dtype`` (None:
    q's)."""
    rows, q_heads, q_len, head_dim = q.shape
    kv_heads = keys.shape[1]
    out_dtype = out_dtype or q.dtype
    # The group's query heads as extra query rows of their KV head: no K/V is repeated.
    qg = q.reshape(rows, kv_heads, -1, head_dim)
    if impl == "sdpa":
        if out_dtype != q.dtype:  # the fused op answers in its inputs' dtype
            qg, keys, values, bias = (t.to(out_dtype) for t in (qg, keys, values, bias))
        out, total = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qg, keys, values, attn_mask=bias,
                                                                               scale=scale)
        out = out.view(rows, q_heads, q_len, head_dim)
        if not lse:
            return out, None
        # The fused op gives a row without keys lse 0 (and output 0): make it -inf.
        empty = torch.isneginf(bias.amax(-1, keepdim=True)).expand(rows, kv_heads, -1, 1)[..., 0]
        return out, total.float().masked_fill(empty.expand_as(total), float("-inf")).view(rows, q_heads, q_len)
    scores = torch.matmul(qg.float(), keys.float().transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores + bias.float()
    peak = scores.amax(-1, keepdim=True)
    # A row with no candidate has peak -inf: shift by 0 so exp() gives 0, not NaN.
    peak = torch.where(torch.isneginf(peak), 0.0, peak)
    weights = torch.exp(scores - peak)
    total = weights.sum(-1)
    out = torch.matmul(weights, values.float()) / torch.where(total > 0, total, 1.0)[..., None]
    out = out.to(out_dtype).view(rows, q_heads, q_len, head_dim)
    if not lse:
        return out, None
    return out, torch.where(total > 0, peak[..., 0] + torch.log(total), float("-inf")).view(rows, q_heads, q_len)


def _check(q, slab, slots, bias, impl) -> None:
    if impl not in _IMPLS:
        raise ConfigError(f"paged_attention: impl must be one of {_IMPLS}, got {impl!r}")
    if q.dim() != 4 or q.dtype not in _DTYPES:
        raise ShapeError(f"paged_attention: q must be (rows, q_heads, q_len, head_dim) of {_DTYPES}, got "
                         f"{q.dtype} {tuple(q.shape)}")
    if slab.dim() != 5 or slab.shape[2] != 2 or slab.shape[4] != q.shape[3] or slab.dtype != q.dtype:
        raise ShapeError(f"paged_attention: slab must be (slots, block_tokens, 2, kv_heads, head_dim="
                         f"{q.shape[3]}) of {q.dtype}, got {slab.dtype} {tuple(slab.shape)}")
    if q.shape[1] % slab.shape[3]:
        raise ShapeError(f"paged_attention: {q.shape[1]} query heads are not a multiple of {slab.shape[3]} KV heads")
    if slots.dim() != 2 or slots.shape[0] != q.shape[0] or slots.dtype != torch.int64:
        raise ShapeError(f"paged_attention: slots must be int64 (rows={q.shape[0]}, n_read), got "
                         f"{slots.dtype} {tuple(slots.shape)}")
    per_row, per_query = (*slots.shape, slab.shape[1]), (slots.shape[0], q.shape[2], *slots.shape[1:], slab.shape[1])
    if bias.dtype != q.dtype or tuple(bias.shape) not in (per_row, per_query):
        raise ShapeError(f"paged_attention: bias must be {q.dtype} {per_row} or {per_query}, got "
                         f"{bias.dtype} {tuple(bias.shape)}")


# ---------------------------------------------------------------------- merge


def merge_attention(outs: list[torch.Tensor], lses: list[torch.Tensor], dtype: torch.dtype | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly merge attentions of the same queries over disjoint key sets: ``outs[i]`` ``(...,
    head_dim)`` with ``lses[i]`` ``outs[i].shape[:-1]`` (``-inf``: an empty part). Returns the
    output in ``dtype`` (None: ``outs[0]``'s) and the fp32 lse, as if one attention ran over the
    union."""
    if not outs or len(outs) != len(lses):
        raise ShapeError(f"merge_attention: need as many lses as outs (at least one), got "
                         f"{len(outs)} outs and {len(lses)} lses")
    for i, (o, l) in enumerate(zip(outs, lses)):
        if o.shape != outs[0].shape or o.dtype != outs[0].dtype or o.device != outs[0].device:
            raise ShapeError(f"merge_attention: outs[{i}] is {o.dtype} {tuple(o.shape)} on {o.device}, "
                             f"outs[0] {outs[0].dtype} {tuple(outs[0].shape)} on {outs[0].device}")
        if l.shape != o.shape[:-1] or l.device != o.device:
            raise ShapeError(f"merge_attention: lses[{i}] has shape {tuple(l.shape)} on {l.device}, "
                             f"expected {tuple(o.shape[:-1])} on {o.device}")
    dtype = dtype or outs[0].dtype
    if len(outs) == 1:
        return outs[0].to(dtype), lses[0].float()
    out, lse = merge_stacked(torch.stack(outs), torch.stack(lses))
    return out.to(dtype), lse


def merge_stacked(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``merge_attention`` of parts stacked on dim 0: ``outs`` ``(P, ..., D)``, ``lses`` ``(P,
    ...)``; fp32 results."""
    lses = lses.float()
    peak = lses.amax(dim=0)
    peak = torch.where(torch.isneginf(peak), 0.0, peak)
    weights = torch.exp(lses - peak)
    total = weights.sum(dim=0)
    out = (weights[..., None] * outs.float()).sum(dim=0) / torch.where(total > 0, total, 1.0)[..., None]
    return out, torch.where(total > 0, peak + torch.log(total), float("-inf"))


# ---------------------------------------------------------------------- Triton


@functools.cache
def _triton():
    """The compiled-on-demand Triton decode kernel, or None without Triton."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def paged_decode(q_ptr, slab_ptr, slots_ptr, bias_ptr, ek_ptr, ev_ptr, ebias_ptr, out_ptr, lse_ptr, scale,
                     rows, kv_heads, group, n_read, block_tokens, head_dim, per_split, n_split, n_extra,
                     s_slot, s_tok, s_kv, s_head, se_row, se_head, se_tok,
                     BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                     PRECISION: tl.constexpr):
        # Program (row * kv_heads + kh, split): the group's query heads of KV head kh, online
        # softmax over blocks [split * per_split, ...) of the row read through their slots; the
        # program with split == n_split walks the extra (estimated) tokens in tiles instead. Each
        # writes a normalised partial output and its lse, merged afterwards.
        rh = tl.program_id(0)
        split = tl.program_id(1)
        row = rh // kv_heads
        kh = rh % kv_heads
        g = tl.arange(0, BLOCK_G)
        t = tl.arange(0, BLOCK_T)
        d = tl.arange(0, BLOCK_D)
        g_ok = g < group
        d_ok = d < head_dim
        heads = row * kv_heads * group + kh * group + g
        q = tl.load(q_ptr + heads[:, None] * head_dim + d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        is_extra = split == n_split
        for j in range(0, tl.where(is_extra, tl.cdiv(n_extra, BLOCK_T), per_split)):
            if is_extra:
                tok = j * BLOCK_T + t
                t_in = tok < n_extra
                bias_ptrs = ebias_ptr + row * n_extra + tok
                k_ptrs = ek_ptr + row * se_row + kh * se_head + tok[:, None] * se_tok + d[None, :]
                v_ptrs = ev_ptr + row * se_row + kh * se_head + tok[:, None] * se_tok + d[None, :]
            else:
                i = split * per_split + j
                # The last split may have fewer blocks: past n_read, no token is in range (a compare
                # of the block, not a scalar mask, which Triton's interpreter takes as int32).
                t_in = t < tl.where(i < n_read, block_tokens, 0)
                # Clamped, not masked: t_in masks the tile. int64: offsets pass 2**31.
                slot = tl.load(slots_ptr + row * n_read + tl.minimum(i, n_read - 1))
                bias_ptrs = bias_ptr + (row * n_read + i) * block_tokens + t
                k_ptrs = slab_ptr + slot * s_slot + t[:, None] * s_tok + kh * s_head + d[None, :]
                v_ptrs = k_ptrs + s_kv
            tile = t_in[:, None] & d_ok[None, :]
            bias = tl.load(bias_ptrs, mask=t_in, other=float("-inf")).to(tl.float32)
            keys = tl.load(k_ptrs, mask=tile, other=0.0)
            s = tl.dot(q, tl.trans(keys), input_precision=PRECISION) * scale + bias[None, :]
            s = tl.where(t_in[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            # While every score so far is -inf, shift by 0 so exp() gives 0, not NaN.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - shift)
            p = tl.exp(s - shift[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            values = tl.load(v_ptrs, mask=tile, other=0.0)
            # p is rounded to the value dtype for the tensor-core product (as FlashAttention
            # does); the sum l stays fp32, so only the weights' 16-bit rounding enters the output.
            acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values, input_precision=PRECISION)
            m = m_new
        nonempty = l > 0.0
        out = acc / tl.where(nonempty, l, 1.0)[:, None]
        lse = tl.where(nonempty, m + tl.log(l), float("-inf"))
        part = split * rows * kv_heads * group + heads
        tl.store(out_ptr + part[:, None] * head_dim + d[None, :], out, mask=g_ok[:, None] & d_ok[None, :])
        tl.store(lse_ptr + part, lse, mask=g_ok)

    return triton, paged_decode


def _paged_triton(q, slab, slots, bias, scale, extra, out_dtype):
    triton, kernel = _triton()
    rows, q_heads, _, head_dim = q.shape
    n_read, bt, kv_heads = slots.shape[1], slab.shape[1], slab.shape[3]
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
    splits = max(1, min(n_read, -(-_PROGRAMS_PER_SM * sms // (rows * kv_heads))))
    per_split = max(1, -(-n_read // splits))
    splits = -(-n_read // per_split) if n_read else 1
    if extra is None:
        ek = ev = torch.zeros(rows, kv_heads, 0, head_dim, dtype=q.dtype, device=q.device)
        ebias = torch.zeros(rows, 0, dtype=q.dtype, device=q.device)
    else:
        # The kernel walks keys and values with one set of strides, the head dimension unit-stride.
        ek, ev, ebias = (t.contiguous() for t in extra)
    programs = splits + (1 if ek.shape[2] else 0)
    out = torch.empty(programs, rows, q_heads, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(programs, rows, q_heads, dtype=torch.float32, device=q.device)
    kernel[(rows * kv_heads, programs)](
        q.contiguous(), slab, slots.contiguous(), bias.contiguous(), ek, ev, ebias, out, lse, scale,
        rows, kv_heads, q_heads // kv_heads, n_read, bt, head_dim, per_split, splits, ek.shape[2],
        slab.stride(0), slab.stride(1), slab.stride(2), slab.stride(3), ek.stride(0), ek.stride(1), ek.stride(2),
        # tl.dot needs every dimension >= 16: the query group and short blocks are padded up.
        BLOCK_G=max(16, triton.next_power_of_2(q_heads // kv_heads)),
        BLOCK_T=max(16, triton.next_power_of_2(bt)),
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    merged, total = merge_stacked(out, lse)
    return merged.to(out_dtype).unsqueeze(2), total.unsqueeze(2)


def interpreting() -> bool:
    """True under Triton's CPU interpreter (``TRITON_INTERPRET=1``): the kernels then run on CPU
    tensors, which is how they are tested without a GPU."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_available() -> bool:
    """True when the Triton kernels can run (Triton installed and a CUDA device present)."""
    return torch.cuda.is_available() and _triton() is not None
