"""Block-sparse decode attention: exact softmax attention of one sequence's queries over selected KV blocks.

The caller (the selector and the manager) decides which blocks each KV head reads and gathers them into
``k`` / ``v`` of shape ``(n_blocks, kv_heads, block_tokens, head_dim)``; this module only sees that
gathered block table, a per-head selection mask and each block's fill. It knows nothing of tiers or
policy (FlashInfer's split: a host-side *plan* compacts the mask into a per-head list of selected
blocks, the *run* reads only those, so its cost scales with the selected blocks, not the context).

Semantics (both implementations):

- GQA: query head ``h`` reads KV head ``h // (q_heads // kv_heads)``.
- Key ``j`` of gathered block ``i`` sits at token position ``i * block_tokens + j``; it is a candidate
  for KV head ``kh`` when ``block_mask[kh, i]`` and ``j < block_len[i]``. With ``causal_from = c``, query
  row ``r`` (at position ``c + r``) additionally sees only keys at positions ``<= c + r``.
- The softmax is exact over the candidates, computed in fp32; the output is cast to ``q.dtype`` and the
  log-sum-exp of the scaled scores is returned in fp32 (natural log).
- A query row with no candidate key gets an all-zero output and ``lse = -inf``: it carries no weight
  when partial results are merged with ``merge_attention``.

``impl="torch"`` is the reference, which defines the results. ``impl="triton"`` runs a flash-decoding
kernel for decode (``q_len == 1``) on CUDA; Triton is imported lazily, so this module imports and the
torch path runs without it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..errors import ConfigError, ShapeError

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_IMPLS = ("auto", "torch", "triton")
# Upper bound on the fp32 score elements the torch reference materialises at once (256 MiB); longer
# query spans are processed in row chunks so a long causal prefill does not blow up memory.
_MAX_SCORE_ELEMENTS = 1 << 26
# The split kernel aims at this many programs per SM so that a decode step fills the GPU even with
# few KV heads; each program then walks at least one selected block.
_PROGRAMS_PER_SM = 4


@dataclass(frozen=True)
class _BlockPlan:
    """Compacted selection: for each KV head, the indices of its selected blocks, in block order.

    ``table`` is ``(kv_heads, max_selected)`` int32, row ``kh`` holding the selected block indices of KV
    head ``kh`` in its first ``counts[kh]`` entries (the rest are padding and must not be read);
    ``counts`` is ``(kv_heads,)`` int32; ``max_selected`` is ``counts.max()`` as a Python int.
    """

    table: torch.Tensor
    counts: torch.Tensor
    max_selected: int


def _plan(block_mask: torch.Tensor) -> _BlockPlan:
    """Compact ``block_mask`` ``(kv_heads, n_blocks)`` into per-head block lists (one host sync)."""
    counts = block_mask.sum(dim=1, dtype=torch.int32)
    max_selected = int(counts.max()) if block_mask.numel() else 0
    # A stable descending sort of the 0/1 mask moves each head's selected blocks to the front of its
    # row while keeping them in block order (sequential reads of the gathered K/V).
    order = torch.sort(block_mask.to(torch.uint8), dim=1, descending=True, stable=True).indices
    return _BlockPlan(order[:, :max_selected].to(torch.int32).contiguous(), counts, max_selected)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor,
                  block_len: torch.Tensor, causal_from: int | None, impl: str) -> None:
    """Raise ``ShapeError`` (tensors) or ``ConfigError`` (options) on malformed arguments."""
    for name, t in (("q", q), ("k", k), ("v", v), ("block_mask", block_mask), ("block_len", block_len)):
        if not isinstance(t, torch.Tensor):
            raise ShapeError(f"block_sparse_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 3:
        raise ShapeError(f"block_sparse_attention: q has shape {tuple(q.shape)}, expected "
                         "(q_heads, q_len, head_dim)")
    if k.dim() != 4:
        raise ShapeError(f"block_sparse_attention: k has shape {tuple(k.shape)}, expected "
                         "(n_blocks, kv_heads, block_tokens, head_dim)")
    if v.shape != k.shape:
        raise ShapeError(f"block_sparse_attention: v has shape {tuple(v.shape)}, "
                         f"expected k's {tuple(k.shape)}")
    n_blocks, kv_heads, _, head_dim = k.shape
    q_heads = q.shape[0]
    if q.shape[2] != head_dim:
        raise ShapeError(f"block_sparse_attention: q has head_dim {q.shape[2]} (shape {tuple(q.shape)}), "
                         f"k has {head_dim} (shape {tuple(k.shape)})")
    if kv_heads == 0 or q_heads % kv_heads:
        raise ShapeError(f"block_sparse_attention: q_heads={q_heads} (q {tuple(q.shape)}) is not a positive "
                         f"multiple of kv_heads={kv_heads} (k {tuple(k.shape)})")
    if q.dtype not in _DTYPES:
        raise ShapeError(f"block_sparse_attention: q has dtype {q.dtype}, expected one of {_DTYPES}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ShapeError(f"block_sparse_attention: {name} has dtype {t.dtype}, expected q's {q.dtype}")
    if block_mask.dtype != torch.bool or tuple(block_mask.shape) != (kv_heads, n_blocks):
        raise ShapeError(f"block_sparse_attention: block_mask is {block_mask.dtype} "
                         f"{tuple(block_mask.shape)}, expected torch.bool "
                         f"(kv_heads={kv_heads}, n_blocks={n_blocks})")
    if block_len.dtype.is_floating_point or block_len.dtype.is_complex or block_len.dtype == torch.bool \
            or tuple(block_len.shape) != (n_blocks,):
        raise ShapeError(f"block_sparse_attention: block_len is {block_len.dtype} {tuple(block_len.shape)}, "
                         f"expected an integer tensor (n_blocks={n_blocks},)")
    for name, t in (("k", k), ("v", v), ("block_mask", block_mask), ("block_len", block_len)):
        if t.device != q.device:
            raise ShapeError(f"block_sparse_attention: {name} is on {t.device}, q on {q.device}")
    if causal_from is not None and (not isinstance(causal_from, int) or isinstance(causal_from, bool)):
        raise ConfigError(f"block_sparse_attention: causal_from must be an int or None, got {causal_from!r}")
    if impl not in _IMPLS:
        raise ConfigError(f"block_sparse_attention: impl must be one of {_IMPLS}, got {impl!r}")


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor,
                           block_len: torch.Tensor, scale: float, causal_from: int | None = None,
                           impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of ``q`` over the selected, valid tokens of the gathered blocks (module docstring).

    Args:
        q: ``(q_heads, q_len, head_dim)`` queries of one sequence, RoPE applied; fp32, fp16 or bf16.
        k, v: ``(n_blocks, kv_heads, block_tokens, head_dim)`` gathered key / value blocks, q's dtype.
        block_mask: ``(kv_heads, n_blocks)`` bool, which blocks each KV head attends to.
        block_len: ``(n_blocks,)`` integer, valid tokens (from the start) of each block.
        scale: factor applied to ``q . k`` before the softmax (usually ``head_dim ** -0.5``).
        causal_from: token position of ``q[:, 0]`` in the gathered key layout, for a causal mask over
            several query rows; None: no causal mask (decode, every cached key precedes the query).
        impl: ``"torch"``, ``"triton"`` or ``"auto"`` (Triton when installed and ``q`` is on CUDA).
            The Triton kernel serves decode (``q_len == 1``); longer queries run the torch reference.

    Returns:
        ``(out, lse)``: ``out`` ``(q_heads, q_len, head_dim)`` in q's dtype; ``lse`` ``(q_heads, q_len)``
        fp32 log-sum-exp of the scaled scores. Rows with no candidate key: zeros and ``-inf``.

    Raises:
        ShapeError: a tensor has the wrong rank, shape, dtype or device.
        ConfigError: unknown ``impl``, ``impl="triton"`` without Triton or CUDA, bad ``causal_from``.
    """
    _check_inputs(q, k, v, block_mask, block_len, causal_from, impl)
    if impl == "triton" and not (q.is_cuda and _triton_kernels() is not None):
        raise ConfigError(f"block_sparse_attention: impl='triton' needs Triton installed and CUDA tensors "
                          f"(Triton {'found' if _triton_kernels() is not None else 'not installed'}, "
                          f"q on {q.device})")
    plan = _plan(block_mask)
    # The kernel has no causal mask: it takes decode rows (one query, no causal bound); any other
    # query span, on any impl, runs the reference.
    if impl != "torch" and q.is_cuda and q.shape[1] == 1 and causal_from is None \
            and _triton_kernels() is not None:
        return _attention_triton(q, k, v, plan, block_len, float(scale))
    return _attention_torch(q, k, v, plan, block_len, float(scale), causal_from)


def _attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: _BlockPlan,
                     block_len: torch.Tensor, scale: float, causal_from: int | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: gather each KV head's selected blocks, then one batched fp32 softmax per row chunk."""
    q_heads, q_len, head_dim = q.shape
    kv_heads, block_tokens = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    out = torch.zeros(q_heads, q_len, head_dim, dtype=q.dtype, device=q.device)
    lse = torch.full((q_heads, q_len), float("-inf"), dtype=torch.float32, device=q.device)
    if plan.max_selected == 0 or q_len == 0:
        return out, lse

    table = plan.table.long()                                              # (kv_heads, S)
    heads = torch.arange(kv_heads, device=q.device)[:, None]
    # k[table, heads]: (kv_heads, S, block_tokens, head_dim), only the selected blocks of each head.
    keys = k[table, heads].float().reshape(kv_heads, -1, head_dim)        # (kv_heads, S*T, D)
    values = v[table, heads].float().reshape(kv_heads, -1, head_dim)
    slot = torch.arange(plan.max_selected, device=q.device)
    tok = torch.arange(block_tokens, device=q.device)
    valid = ((slot[None, :] < plan.counts[:, None])[:, :, None]            # padding of the plan
             & (tok[None, None, :] < block_len[table][:, :, None]))        # (kv_heads, S, T)
    valid = valid.reshape(kv_heads, 1, 1, -1)
    position = (table[:, :, None] * block_tokens + tok).reshape(kv_heads, 1, 1, -1)

    qg = q.float().reshape(kv_heads, group, q_len, head_dim)
    rows = max(1, _MAX_SCORE_ELEMENTS // (q_heads * keys.shape[1]))
    for start in range(0, q_len, rows):
        stop = min(q_len, start + rows)
        scores = torch.matmul(qg[:, :, start:stop], keys[:, None].transpose(-1, -2)) * scale
        allowed = valid
        if causal_from is not None:
            query_pos = torch.arange(causal_from + start, causal_from + stop, device=q.device)
            allowed = allowed & (position <= query_pos[:, None])
        scores = scores.masked_fill_(~allowed, float("-inf"))             # (kv_heads, G, rows, S*T)
        peak = scores.amax(dim=-1, keepdim=True)
        # A row with no candidate has peak -inf; shifting by 0 instead keeps exp() at 0 rather than NaN.
        peak = torch.where(torch.isneginf(peak), torch.zeros_like(peak), peak)
        weights = torch.exp(scores - peak)
        total = weights.sum(dim=-1)
        acc = torch.matmul(weights, values[:, None])                      # (kv_heads, G, rows, D)
        nonempty = total > 0
        out[:, start:stop] = (acc / torch.where(nonempty, total, 1.0)[..., None]).reshape(
            q_heads, stop - start, head_dim).to(q.dtype)
        lse[:, start:stop] = torch.where(nonempty, peak[..., 0] + torch.log(total),
                                         float("-inf")).reshape(q_heads, stop - start)
    return out, lse


def _merge_stacked(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``P`` partial attentions: ``outs`` ``(P, ..., D)``, ``lses`` ``(P, ...)``; fp32 results.

    ``out = sum_i exp(lse_i) out_i / sum_i exp(lse_i)``, ``lse = log sum_i exp(lse_i)``, computed shifted
    by the largest lse; parts with ``lse = -inf`` weigh nothing, and all-empty rows stay zeros / -inf.
    """
    lses = lses.float()
    peak = lses.amax(dim=0)
    peak = torch.where(torch.isneginf(peak), torch.zeros_like(peak), peak)
    weights = torch.exp(lses - peak)                                       # (P, ...)
    total = weights.sum(dim=0)
    nonempty = total > 0
    out = (weights[..., None] * outs.float()).sum(dim=0) / torch.where(nonempty, total, 1.0)[..., None]
    return out, torch.where(nonempty, peak + torch.log(total), float("-inf"))


def merge_attention(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly merge attentions of the same queries over disjoint key sets.

    Args:
        outs: partial outputs, each ``(..., head_dim)`` (e.g. ``(q_heads, q_len, head_dim)``), one dtype.
        lses: their log-sum-exps, each ``outs[i].shape[:-1]``; ``-inf`` marks an empty part.

    Returns:
        ``(out, lse)`` as if attention had run over the union of the key sets: ``out`` in the dtype of
        ``outs[0]`` (the merge itself runs in fp32), ``lse`` fp32.
    """
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
    out, lse = _merge_stacked(torch.stack(outs), torch.stack(lses))
    return out.to(outs[0].dtype), lse


@functools.cache
def _triton_kernels():
    """The compiled-on-demand Triton split kernel, or None when Triton is not installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def split_kernel(q_ptr, k_ptr, v_ptr, table_ptr, counts_ptr, len_ptr, out_ptr, lse_ptr,
                     scale, q_heads, group, block_tokens, head_dim, table_stride, blocks_per_split,
                     stride_kn, stride_kh, stride_kt, stride_vn, stride_vh, stride_vt,
                     BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                     PRECISION: tl.constexpr):
        # Program (kh, split): the `group` query heads of KV head kh against selected blocks
        # [split * blocks_per_split, ...) of kh's compacted list, with a running max / sum (online
        # softmax). It writes a normalised partial output and its lse; the host merges the splits.
        kh = tl.program_id(0)
        split = tl.program_id(1)
        g = tl.arange(0, BLOCK_G)
        t = tl.arange(0, BLOCK_T)
        d = tl.arange(0, BLOCK_D)
        heads = kh * group + g
        g_ok = g < group
        d_ok = d < head_dim
        # Rows g >= group are zero padding up to tl.dot's minimum of 16 rows; they are never stored.
        q = tl.load(q_ptr + heads[:, None] * head_dim + d[None, :], mask=g_ok[:, None] & d_ok[None, :],
                    other=0.0)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        start = split * blocks_per_split
        stop = tl.minimum(start + blocks_per_split, tl.load(counts_ptr + kh))
        for i in range(start, stop):
            block = tl.load(table_ptr + kh * table_stride + i).to(tl.int64)  # int64: offsets pass 2**31
            # Both bounds: block_len may exceed block_tokens, and BLOCK_T may pad past it.
            t_ok = (t < tl.load(len_ptr + block)) & (t < block_tokens)
            tile = t_ok[:, None] & d_ok[None, :]
            keys = tl.load(k_ptr + block * stride_kn + kh * stride_kh + t[:, None] * stride_kt + d[None, :],
                           mask=tile, other=0.0)
            s = tl.dot(q, tl.trans(keys), input_precision=PRECISION) * scale    # (BLOCK_G, BLOCK_T) fp32
            s = tl.where(t_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            # While every score so far is -inf (an empty block), shift by 0 so exp() gives 0, not NaN.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - shift)
            p = tl.exp(s - shift[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            values = tl.load(v_ptr + block * stride_vn + kh * stride_vh + t[:, None] * stride_vt + d[None, :],
                             mask=tile, other=0.0)
            # p is rounded to the value dtype for the tensor-core product (as FlashAttention does);
            # the sum l above stays fp32, so only the weights' 16-bit rounding enters the output.
            acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values, input_precision=PRECISION)
            m = m_new
        nonempty = l > 0.0
        out = acc / tl.where(nonempty, l, 1.0)[:, None]
        lse = tl.where(nonempty, m + tl.log(l), float("-inf"))
        row = split * q_heads + heads
        tl.store(out_ptr + row[:, None] * head_dim + d[None, :], out, mask=g_ok[:, None] & d_ok[None, :])
        tl.store(lse_ptr + row, lse, mask=g_ok)

    return triton, split_kernel


def triton_available() -> bool:
    """True when the Triton kernel can run (Triton installed and a CUDA device present)."""
    return torch.cuda.is_available() and _triton_kernels() is not None


def _split_size(max_selected: int, kv_heads: int, device: torch.device) -> int:
    """Selected blocks per program: enough programs to give each SM ``_PROGRAMS_PER_SM`` of them."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    splits_per_head = max(1, -(-_PROGRAMS_PER_SM * sms // kv_heads))
    return max(1, -(-max_selected // splits_per_head))


def _attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: _BlockPlan,
                      block_len: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash-decoding for ``q_len == 1``: the split kernel over the plan, then a log-sum-exp merge."""
    triton, split_kernel = _triton_kernels()
    q_heads, _, head_dim = q.shape
    kv_heads, block_tokens = k.shape[1], k.shape[2]
    if plan.max_selected == 0:
        return (torch.zeros_like(q),
                torch.full((q_heads, 1), float("-inf"), dtype=torch.float32, device=q.device))
    per_split = _split_size(plan.max_selected, kv_heads, q.device)
    splits = -(-plan.max_selected // per_split)
    # The kernel addresses the head dimension with unit stride; gathered blocks normally have it.
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    partial_out = torch.empty(splits, q_heads, head_dim, dtype=torch.float32, device=q.device)
    partial_lse = torch.empty(splits, q_heads, dtype=torch.float32, device=q.device)
    split_kernel[(kv_heads, splits)](
        q.contiguous(), k, v, plan.table, plan.counts, block_len, partial_out, partial_lse,
        scale, q_heads, q_heads // kv_heads, block_tokens, head_dim, plan.table.stride(0), per_split,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        # tl.dot needs every dimension >= 16: the query group and short blocks are padded up.
        BLOCK_G=max(16, triton.next_power_of_2(q_heads // kv_heads)),
        BLOCK_T=max(16, triton.next_power_of_2(block_tokens)),
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    out, lse = _merge_stacked(partial_out[:, :, None], partial_lse[:, :, None])
    return out.to(q.dtype), lse
