"""Paged attention over the device slab, the new tokens' causal attention, the log-sum-exp merge,
row copies between host and device, and input validation. Every implementation is compared with
a dense float64 computation; the Triton kernels run on CUDA (``-m gpu``) or, without a GPU,
under Triton's CPU interpreter when Triton is installed (``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiercache.errors import ConfigError, ShapeError
from tiercache.kernels.attention import causal_attention, merge_attention, paged_attention
from tiercache.kernels.rows import gather_rows, scatter_rows

# (atol, rtol) on outputs of unit-variance values, by dtype: fp32 compute error, else the output rounding.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def random_paged(gen, dtype, rows, q_heads, kv_heads, q_len, n_read, block_tokens, head_dim, p_valid,
                 slots=12, device="cpu"):
    """q, a slab of ``slots`` slots (+ scratch), the slots each row reads (repeats allowed), and a
    bias with roughly ``p_valid`` of the tokens attended."""
    q = torch.randn(rows, q_heads, q_len, head_dim, generator=gen).to(dtype)
    slab = torch.randn(slots + 1, block_tokens, 2, kv_heads, head_dim, generator=gen).to(dtype)
    read = torch.randint(0, slots, (rows, n_read), generator=gen)
    valid = torch.rand(rows, n_read, block_tokens, generator=gen) < p_valid
    bias = torch.zeros(valid.shape).masked_fill(~valid, float("-inf")).to(dtype)
    return tuple(t.to(device) for t in (q, slab, read, bias))


def dense_paged(q, slab, slots, bias, scale):
    """Per row and query head, the attended keys concatenated, softmax(q k^T * scale) v in float64."""
    rows, q_heads, q_len, head_dim = q.shape
    kv_heads = slab.shape[3]
    group = q_heads // kv_heads
    out = torch.zeros(rows, q_heads, q_len, head_dim, dtype=torch.float64)
    lse = torch.full((rows, q_heads, q_len), -math.inf, dtype=torch.float64)
    for r in range(rows):
        blocks = slab[slots[r]].double()                         # (n, bt, 2, H, D)
        keep = ~torch.isinf(bias[r].double())                    # (n, bt)
        for h in range(q_heads):
            keys = blocks[:, :, 0, h // group][keep]
            values = blocks[:, :, 1, h // group][keep]
            if not len(keys):
                continue
            scores = keys @ q[r, h].double().T * scale           # (tokens, q_len)
            out[r, h] = torch.softmax(scores, 0).T @ values
            lse[r, h] = torch.logsumexp(scores, 0)
    return out, lse


def assert_close(out, lse, ref_out, ref_lse, dtype):
    atol, rtol = TOL[dtype]
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.double().cpu(), ref_out, atol=atol, rtol=rtol)
    assert torch.equal(torch.isneginf(lse.cpu()), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double().cpu()[finite], ref_lse[finite], atol=1e-4, rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       impl=st.sampled_from(["torch", "sdpa"]),
       rows=st.integers(1, 3), group=st.sampled_from([1, 3, 4]), kv_heads=st.integers(1, 3),
       q_len=st.sampled_from([1, 1, 2, 5]), n_read=st.integers(1, 7), block_tokens=st.sampled_from([1, 4, 16]),
       head_dim=st.sampled_from([8, 32]), p_valid=st.sampled_from([0.0, 0.3, 0.8, 1.0]))
def test_paged_attention_matches_dense(seed, dtype, impl, rows, group, kv_heads, q_len, n_read, block_tokens,
                                       head_dim, p_valid):
    gen = torch.Generator().manual_seed(seed)
    q, slab, slots, bias = random_paged(gen, dtype, rows, group * kv_heads, kv_heads, q_len, n_read,
                                        block_tokens, head_dim, p_valid)
    scale = head_dim**-0.5
    out, lse = paged_attention(q, slab, slots, bias, scale, impl=impl)
    assert_close(out, lse, *dense_paged(q, slab, slots, bias, scale), dtype)


@pytest.mark.parametrize("impl", ["torch", "sdpa"])
def test_extra_tokens_join_the_same_softmax(impl):
    """Estimated virtual tokens (keys, values and a score bias) attended beside the blocks read give
    what one attention over both sets gives."""
    gen = torch.Generator().manual_seed(7)
    q, slab, slots, bias = random_paged(gen, torch.float32, 2, 6, 2, 1, 4, 8, 16, 0.8)
    ek, ev = torch.randn(2, 2, 5, 16, generator=gen), torch.randn(2, 2, 5, 16, generator=gen)
    ebias = torch.randn(2, 5, generator=gen)
    ebias[1, 2:] = float("-inf")
    out, lse = paged_attention(q, slab, slots, bias, 0.3, impl=impl, extra=(ek, ev, ebias))
    # The same computed by hand: extra tokens as a fifth, dense part merged by log-sum-exp.
    qg = q.view(2, 2, 3, 16).double()
    scores = torch.einsum("rhgd,rhtd->rhgt", qg, ek.double()) * 0.3 + ebias.double()[:, None, None]
    extra_lse = torch.logsumexp(scores, -1)
    extra_out = torch.einsum("rhgt,rhtd->rhgd", torch.softmax(scores, -1), ev.double())
    read_out, read_lse = dense_paged(q, slab, slots, bias, 0.3)
    merged, merged_lse = merge_attention([read_out, extra_out.reshape(2, 6, 1, 16)],
                                         [read_lse, extra_lse.reshape(2, 6, 1)])
    assert_close(out, lse, merged, merged_lse.double(), torch.float32)


def test_gqa_head_mapping_and_empty_rows():
    """Query heads 0..3 read KV head 0 and 4..7 KV head 1; a row with no valid key gives zeros
    and -inf."""
    gen = torch.Generator().manual_seed(2)
    q, slab, slots, bias = random_paged(gen, torch.float32, 2, 8, 2, 1, 3, 4, 16, 1.0)
    slab[:, :, 1, 0] = 0.0
    slab[:, :, 1, 1] = 1.0
    bias[1] = float("-inf")
    for impl in ("torch", "sdpa"):
        out, lse = paged_attention(q, slab, slots, bias, 0.25, impl=impl)
        torch.testing.assert_close(out[0, :4], torch.zeros(4, 1, 16))
        torch.testing.assert_close(out[0, 4:], torch.ones(4, 1, 16))
        assert torch.all(out[1] == 0) and torch.all(torch.isneginf(lse[1])) and torch.isfinite(lse[0]).all()
    out, none = paged_attention(q, slab, slots, bias, 0.25, lse=False)
    assert none is None and torch.all(out[1] == 0)


@pytest.mark.parametrize("impl", ["torch", "sdpa"])
def test_causal_attention_of_new_tokens_with_padding(impl):
    gen = torch.Generator().manual_seed(3)
    rows, q_heads, kv_heads, n, q_len, d = 2, 6, 2, 9, 4, 16
    q = torch.randn(rows, q_heads, q_len, d, generator=gen)
    k = torch.randn(rows, kv_heads, n, d, generator=gen)
    v = torch.randn(rows, kv_heads, n, d, generator=gen)
    valid = torch.ones(rows, n, dtype=torch.bool)
    valid[1, :7] = False  # row 1: left padding; its first query sees nothing
    out, lse = causal_attention(q, k, v, valid, 0.3, impl=impl)
    kk, vv = k.repeat_interleave(3, 1).double(), v.repeat_interleave(3, 1).double()
    scores = q.double() @ kk.transpose(-1, -2) * 0.3
    allowed = torch.ones(q_len, n, dtype=torch.bool).tril(n - q_len) & valid[:, None, None, :]
    scores = scores.masked_fill(~allowed, -math.inf)
    ref_lse = torch.logsumexp(scores, -1)
    ref = torch.nan_to_num(torch.softmax(scores, -1)) @ vv
    assert_close(out, lse, ref, ref_lse, torch.float32)
    assert torch.isneginf(lse[1, :, 0]).all()


def test_merge_of_two_halves_equals_whole():
    gen = torch.Generator().manual_seed(4)
    q, slab, slots, bias = random_paged(gen, torch.float32, 2, 12, 4, 3, 10, 8, 32, 0.7)
    bias[1, :5] = float("-inf")  # row 1 has nothing in the first half
    parts = [paged_attention(q, slab, slots[:, a:b], bias[:, a:b], 0.2) for a, b in ((0, 5), (5, 10))]
    out, lse = merge_attention([p[0] for p in parts], [p[1] for p in parts])
    whole, whole_lse = paged_attention(q, slab, slots, bias, 0.2)
    torch.testing.assert_close(out, whole, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, whole_lse)


def test_merge_keeps_dtype_and_single_part():
    out = torch.randn(4, 2, 8).bfloat16()
    lse = torch.randn(4, 2)
    merged, merged_lse = merge_attention([out], [lse])
    assert merged.dtype == torch.bfloat16
    torch.testing.assert_close(merged, out)
    torch.testing.assert_close(merged_lse, lse)


def _valid_args():
    gen = torch.Generator().manual_seed(5)
    q, slab, slots, bias = random_paged(gen, torch.float32, 2, 8, 2, 1, 3, 4, 16, 1.0)
    return dict(q=q, slab=slab, slots=slots, bias=bias, scale=0.25)


@pytest.mark.parametrize("change,error,words", [
    (dict(q=torch.randn(8, 1, 16)), ShapeError, ["q", "(8, 1, 16)"]),
    (dict(q=torch.randn(2, 8, 1, 16).double()), ShapeError, ["q", "float64"]),
    (dict(slab=torch.randn(13, 4, 2, 2, 32)), ShapeError, ["slab", "head_dim=16"]),
    (dict(q=torch.randn(2, 5, 1, 16)), ShapeError, ["5 query heads", "2 KV heads"]),
    (dict(slots=torch.zeros(2, 3, dtype=torch.int32)), ShapeError, ["slots", "int32"]),
    (dict(slots=torch.zeros(3, 3, dtype=torch.int64)), ShapeError, ["slots", "rows=2"]),
    (dict(bias=torch.zeros(2, 3, 4, dtype=torch.bool)), ShapeError, ["bias", "torch.bool"]),
    (dict(bias=torch.zeros(2, 4, 4)), ShapeError, ["bias", "(2, 3, 4)"]),
    (dict(impl="cuda"), ConfigError, ["impl", "'cuda'"]),
])
def test_bad_inputs_name_the_argument(change, error, words):
    with pytest.raises(error) as info:
        paged_attention(**{**_valid_args(), **change})
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize("bad_lse,words", [
    (torch.zeros(4), ["lses[1]", "(4,)", "(4, 2)"]),
    (None, ["outs", "lses"]),
])
def test_merge_bad_inputs(bad_lse, words):
    outs = [torch.zeros(4, 2, 8), torch.zeros(4, 2, 8)]
    lses = [torch.zeros(4, 2)] + ([bad_lse] if bad_lse is not None else [])
    with pytest.raises(ShapeError) as info:
        merge_attention(outs, lses)
    for word in words:
        assert word in str(info.value)


def test_triton_impl_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="impl='triton' needs"):
        paged_attention(**_valid_args(), impl="triton")


def test_row_copies_between_host_and_device():
    src = torch.arange(5 * 8 * 3, dtype=torch.float32).view(5, 8, 3)
    got = gather_rows(src, torch.tensor([3, 4, 0]), impl="torch")
    assert torch.equal(got, src[[3, 4, 0]])
    dst = torch.zeros(5, 8, 3)
    scatter_rows(dst, torch.tensor([1, 4]), src[:2], impl="torch")
    assert torch.equal(dst[1], src[0]) and torch.equal(dst[4], src[1]) and not dst[0].any()


# ---------------------------------------------------------------------- Triton

def _triton_device() -> str | None:
    """Where the Triton kernels can run here: CUDA, the CPU interpreter, or nowhere."""
    from tiercache.kernels.attention import _triton, interpreting

    if _triton() is None:
        return None
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if interpreting() else None


TRITON_CASES = [
    (1, 32, 8, 128, 64, 40, 0.9),    # Llama-3-8B decode shape
    (3, 28, 4, 128, 16, 30, 0.7),    # GQA 7, short blocks, a batch
    (2, 12, 4, 64, 48, 9, 0.5),      # GQA 3, a non-power-of-two block
]


# Triton's CPU interpreter computes bf16 dot products wrongly (a plain 16x16 bf16 tl.dot is off by
# 1e10 there), so bf16 is checked on CUDA only.
TRITON_DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if torch.cuda.is_available() else [])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("rows,q_heads,kv_heads,head_dim,block_tokens,n_read,p_valid", TRITON_CASES)
def test_triton_paged_decode_matches_torch(dtype, rows, q_heads, kv_heads, head_dim, block_tokens, n_read, p_valid):
    device = _triton_device()
    if device is None:
        pytest.fail("needs Triton and CUDA (or TRITON_INTERPRET=1)")
    gen = torch.Generator().manual_seed(6)
    q, slab, slots, bias = random_paged(gen, dtype, rows, q_heads, kv_heads, 1, n_read, block_tokens, head_dim,
                                        p_valid, slots=64, device=device)
    bias[0] = float("-inf")  # a row with nothing to attend
    scale = head_dim**-0.5
    ek = torch.randn(rows, kv_heads, 37, head_dim, generator=gen).to(dtype).to(device)
    ev = torch.randn(rows, kv_heads, 37, head_dim, generator=gen).to(dtype).to(device)
    ebias = torch.randn(rows, 37, generator=gen).to(dtype).to(device)
    ebias[:, 30:] = float("-inf")
    for extra in (None, (ek, ev, ebias)):
        out, lse = paged_attention(q, slab, slots, bias, scale, impl="triton", extra=extra)
        ref_out, ref_lse = paged_attention(q, slab, slots, bias, scale, impl="torch", extra=extra)
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(out.float(), ref_out.float(), atol=atol, rtol=rtol)
        assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
        finite = torch.isfinite(ref_lse)
        torch.testing.assert_close(lse[finite], ref_lse[finite], atol=1e-3, rtol=1e-4)


@pytest.mark.gpu
def test_triton_row_copies_read_and_write_pinned_host_memory():
    device = _triton_device()
    if device is None:
        pytest.fail("needs Triton and CUDA (or TRITON_INTERPRET=1)")
    for shape, dtype in (((5000,), torch.uint8), ((64, 2, 8, 128), torch.bfloat16)):
        host = torch.randn((9, *shape)).to(dtype) if dtype.is_floating_point else torch.randint(0, 255, (9, *shape),
                                                                                             dtype=dtype)
        host = host.pin_memory() if device == "cuda" else host
        index = torch.tensor([4, 8, 0, 4], device=device)
        assert torch.equal(gather_rows(host, index, impl="triton").cpu(), host[[4, 8, 0, 4]])
        rows = host[:2].to(device) + 1
        a = host.clone().pin_memory() if device == "cuda" else host.clone()
        scatter_rows(a, torch.tensor([2, 8], device=device), rows, impl="triton")
        expect = host.clone()
        expect[[2, 8]] = rows.cpu()
        assert torch.equal(a, expect)


@pytest.mark.parametrize("softcap", [None, 1.5])
def test_per_query_bias_and_soft_capping_match_dense(softcap):
    """What windowed layers and Gemma 2 use: a bias per query ``(rows, q_len, n_read, bt)`` in
    ``paged_attention``, a validity per query ``(rows, q_len, n)`` in ``causal_attention``, and
    scaled scores soft-capped to ``softcap * tanh(score / softcap)`` (``"auto"`` picks the torch
    implementation then; the fused ones refuse it)."""
    gen = torch.Generator().manual_seed(7)
    rows, q_heads, kv_heads, q_len, n_read, bt, dim = 2, 4, 2, 3, 4, 4, 8
    q, slab, slots, _ = random_paged(gen, torch.float32, rows, q_heads, kv_heads, q_len, n_read, bt, dim, 1.0)
    keep = torch.rand(rows, q_len, n_read, bt, generator=gen) < 0.6
    bias = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    scale = 0.7

    def dense(keys, values, keep):  # keys/values (rows, kv_heads, n, D), keep (rows, q_len, n)
        group = q_heads // kv_heads
        out = torch.zeros(rows, q_heads, q_len, dim, dtype=torch.float64)
        lse = torch.full((rows, q_heads, q_len), -math.inf, dtype=torch.float64)
        for r in range(rows):
            for h in range(q_heads):
                for i in range(q_len):
                    k, v = keys[r, h // group][keep[r, i]].double(), values[r, h // group][keep[r, i]].double()
                    if not len(k):
                        continue
                    s = k @ q[r, h, i].double() * scale
                    s = s if softcap is None else softcap * torch.tanh(s / softcap)
                    out[r, h, i] = torch.softmax(s, 0) @ v
                    lse[r, h, i] = torch.logsumexp(s, 0)
        return out, lse

    blocks = slab[slots].reshape(rows, n_read * bt, 2, kv_heads, dim)
    keys, values = blocks[:, :, 0].transpose(1, 2), blocks[:, :, 1].transpose(1, 2)
    out, lse = paged_attention(q, slab, slots, bias, scale, softcap=softcap)
    assert_close(out, lse, *dense(keys, values, keep.reshape(rows, q_len, -1)), torch.float32)
    n = n_read * bt
    valid = torch.rand(rows, q_len, n, generator=gen) < 0.7
    out, lse = causal_attention(q, keys, values, valid, scale, softcap=softcap)
    causal = torch.ones(q_len, n, dtype=torch.bool).tril(n - q_len)
    assert_close(out, lse, *dense(keys, values, valid & causal), torch.float32)
    if softcap is not None:
        with pytest.raises(ConfigError, match="impl='torch' only"):
            paged_attention(q, slab, slots, bias, scale, impl="sdpa", softcap=softcap)


@pytest.mark.parametrize("impl,softcap", [("torch", None), ("sdpa", None), ("torch", 1.5)])
def test_extra_tokens_with_a_bias_per_query_and_soft_capping(impl, softcap):
    """Estimated tokens combine with the other two additions: every query attends them, beside its
    own bias over the blocks read, and their scores are soft-capped like the others, their bias
    (log count) added after the cap."""
    gen = torch.Generator().manual_seed(11)
    rows, q_heads, kv_heads, q_len, n_read, bt, dim, m = 2, 4, 2, 3, 2, 4, 8, 5
    q, slab, slots, _ = random_paged(gen, torch.float32, rows, q_heads, kv_heads, q_len, n_read, bt, dim, 1.0)
    keep = torch.rand(rows, q_len, n_read, bt, generator=gen) < 0.6
    bias = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    ek, ev = (torch.randn(rows, kv_heads, m, dim, generator=gen) for _ in range(2))
    ebias = torch.rand(rows, m, generator=gen).mul(2)
    ebias[:, 1:4:2] = -math.inf  # blocks read: their estimates weigh nothing
    out, lse = paged_attention(q, slab, slots, bias, 0.7, impl=impl, extra=(ek, ev, ebias), softcap=softcap)
    blocks = slab[slots].reshape(rows, n_read * bt, 2, kv_heads, dim)
    keys = torch.cat([blocks[:, :, 0].transpose(1, 2), ek], 2).double()
    values = torch.cat([blocks[:, :, 1].transpose(1, 2), ev], 2).double()
    group = q_heads // kv_heads
    for r in range(rows):
        for h in range(q_heads):
            for i in range(q_len):
                s = keys[r, h // group] @ q[r, h, i].double() * 0.7
                s = s if softcap is None else softcap * torch.tanh(s / softcap)
                s = s + torch.cat([bias[r, i].reshape(-1), ebias[r]]).double()
                torch.testing.assert_close(out[r, h, i].double(), torch.softmax(s, 0) @ values[r, h // group],
                                           atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(lse[r, h, i].double(), torch.logsumexp(s, 0), atol=1e-5, rtol=1e-5)
