"""Block-sparse attention: the torch reference against a dense float64 computation, the log-sum-exp merge,
input validation, and (on CUDA) the Triton kernel against the reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiercache.errors import ConfigError, ShapeError
from tiercache.kernels.attention import block_sparse_attention, merge_attention

# (atol, rtol) on outputs of unit-variance values, by dtype: fp32 compute error, else the output rounding.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def dense_reference(q, k, v, block_mask, block_len, scale, causal_from=None):
    """Per query head and row: concatenate the candidate tokens, then softmax(q k^T * scale) v in float64."""
    q_heads, q_len, head_dim = q.shape
    n_blocks, kv_heads, block_tokens, _ = k.shape
    group = q_heads // kv_heads
    out = torch.zeros(q_heads, q_len, head_dim, dtype=torch.float64)
    lse = torch.full((q_heads, q_len), -math.inf, dtype=torch.float64)
    for h in range(q_heads):
        kh = h // group
        tokens = [(i, j) for i in range(n_blocks) if block_mask[kh, i]
                  for j in range(min(int(block_len[i]), block_tokens))]
        for r in range(q_len):
            if causal_from is not None:
                tokens_r = [(i, j) for i, j in tokens if i * block_tokens + j <= causal_from + r]
            else:
                tokens_r = tokens
            if not tokens_r:
                continue
            keys = torch.stack([k[i, kh, j] for i, j in tokens_r]).double()
            values = torch.stack([v[i, kh, j] for i, j in tokens_r]).double()
            scores = keys @ q[h, r].double() * scale
            out[h, r] = torch.softmax(scores, dim=0) @ values
            lse[h, r] = torch.logsumexp(scores, dim=0)
    return out, lse


def random_inputs(gen, dtype, q_heads, kv_heads, q_len, n_blocks, block_tokens, head_dim, p_select,
                  device="cpu"):
    """Random q/k/v of ``dtype``, a random mask, and random block fills (some partial, some empty)."""
    q = torch.randn(q_heads, q_len, head_dim, generator=gen).to(dtype)
    k = torch.randn(n_blocks, kv_heads, block_tokens, head_dim, generator=gen).to(dtype)
    v = torch.randn(n_blocks, kv_heads, block_tokens, head_dim, generator=gen).to(dtype)
    mask = torch.rand(kv_heads, n_blocks, generator=gen) < p_select
    lens = torch.randint(0, block_tokens + 1, (n_blocks,), generator=gen)
    full = torch.rand(n_blocks, generator=gen) < 0.6  # most blocks are full, as in a real cache
    lens = torch.where(full, block_tokens, lens)
    return tuple(t.to(device) for t in (q, k, v, mask, lens))


def assert_close(out, lse, ref_out, ref_lse, dtype):
    atol, rtol = TOL[dtype]
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.double().cpu(), ref_out, atol=atol, rtol=rtol)
    assert torch.equal(torch.isneginf(lse.cpu()), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double().cpu()[finite], ref_lse[finite], atol=1e-4, rtol=1e-5)


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       group=st.sampled_from([1, 3, 4]),
       kv_heads=st.integers(1, 3),
       q_len=st.sampled_from([1, 1, 2, 5]),
       n_blocks=st.integers(0, 7),
       block_tokens=st.sampled_from([1, 4, 16]),
       head_dim=st.sampled_from([8, 32]),
       p_select=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
       causal=st.booleans(),
       causal_shift=st.integers(-3, 40))
def test_torch_matches_dense(seed, dtype, group, kv_heads, q_len, n_blocks, block_tokens, head_dim,
                             p_select, causal, causal_shift):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, mask, lens = random_inputs(gen, dtype, group * kv_heads, kv_heads, q_len, n_blocks,
                                        block_tokens, head_dim, p_select)
    causal_from = causal_shift if causal else None
    scale = head_dim ** -0.5
    out, lse = block_sparse_attention(q, k, v, mask, lens, scale, causal_from=causal_from, impl="torch")
    ref_out, ref_lse = dense_reference(q, k, v, mask, lens, scale, causal_from)
    assert_close(out, lse, ref_out, ref_lse, dtype)


def test_empty_selection_gives_zeros_and_neg_inf():
    gen = torch.Generator().manual_seed(1)
    q, k, v, _, lens = random_inputs(gen, torch.float32, 8, 2, 1, 4, 16, 32, 1.0)
    mask = torch.tensor([[False] * 4, [True, False, True, False]])
    out, lse = block_sparse_attention(q, k, v, mask, lens, 0.2)
    assert torch.all(out[:4] == 0) and torch.all(torch.isneginf(lse[:4]))  # heads of KV head 0
    assert torch.all(torch.isfinite(lse[4:])) and out[4:].abs().sum() > 0


def test_gqa_head_mapping():
    """Query heads 0..3 read KV head 0 and heads 4..7 KV head 1: a head's output is a mix of its values."""
    gen = torch.Generator().manual_seed(2)
    q, k, _, _, lens = random_inputs(gen, torch.float32, 8, 2, 1, 3, 4, 16, 1.0)
    v = torch.zeros_like(k)
    v[:, 1] = 1.0  # KV head 1's values are all ones, KV head 0's all zeros
    out, _ = block_sparse_attention(q, k, v, torch.ones(2, 3, dtype=torch.bool), torch.full((3,), 4), 0.25)
    torch.testing.assert_close(out[:4], torch.zeros(4, 1, 16))
    torch.testing.assert_close(out[4:], torch.ones(4, 1, 16))


@pytest.mark.parametrize("q_len,causal_from", [(1, None), (6, 20)])
def test_merge_of_two_halves_equals_whole(q_len, causal_from):
    gen = torch.Generator().manual_seed(3)
    q, k, v, mask, lens = random_inputs(gen, torch.float32, 12, 4, q_len, 10, 8, 32, 0.6)
    mask[1] = False       # a head with nothing in either half
    mask[2, 5:] = False   # a head with nothing in the second half
    first = mask.clone()
    first[:, 5:] = False
    parts = [block_sparse_attention(q, k, v, m, lens, 0.2, causal_from=causal_from)
             for m in (first, mask & ~first)]
    out, lse = merge_attention([p[0] for p in parts], [p[1] for p in parts])
    whole_out, whole_lse = block_sparse_attention(q, k, v, mask, lens, 0.2, causal_from=causal_from)
    torch.testing.assert_close(out, whole_out, atol=1e-6, rtol=1e-5)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(whole_lse))
    torch.testing.assert_close(lse[torch.isfinite(lse)], whole_lse[torch.isfinite(whole_lse)])


def test_merge_keeps_dtype_and_single_part():
    out = torch.randn(4, 2, 8).bfloat16()
    lse = torch.randn(4, 2)
    merged, merged_lse = merge_attention([out], [lse])
    assert merged.dtype == torch.bfloat16
    torch.testing.assert_close(merged, out)
    torch.testing.assert_close(merged_lse, lse)


def test_long_query_span_is_chunked(monkeypatch):
    """The reference processes long query spans in row chunks; the chunks join to the one-shot result."""
    import tiercache.kernels.attention as attention

    gen = torch.Generator().manual_seed(4)
    q, k, v, mask, lens = random_inputs(gen, torch.float32, 4, 2, 9, 4, 8, 16, 1.0)
    expected = block_sparse_attention(q, k, v, mask, lens, 0.3, causal_from=20)
    monkeypatch.setattr(attention, "_MAX_SCORE_ELEMENTS", 4 * 32 * 2)  # two query rows per chunk
    chunked = block_sparse_attention(q, k, v, mask, lens, 0.3, causal_from=20)
    torch.testing.assert_close(chunked[0], expected[0])
    torch.testing.assert_close(chunked[1], expected[1])


def _valid_args():
    q = torch.randn(8, 1, 16)
    k = torch.randn(3, 2, 4, 16)
    return dict(q=q, k=k, v=torch.randn(3, 2, 4, 16), block_mask=torch.ones(2, 3, dtype=torch.bool),
                block_len=torch.full((3,), 4), scale=0.25)


@pytest.mark.parametrize("change,error,words", [
    (dict(q=torch.randn(8, 16)), ShapeError, ["q", "(8, 16)"]),
    (dict(k=torch.randn(3, 2, 4)), ShapeError, ["k", "(3, 2, 4)"]),
    (dict(v=torch.randn(3, 2, 5, 16)), ShapeError, ["v", "(3, 2, 5, 16)"]),
    (dict(q=torch.randn(8, 1, 32)), ShapeError, ["head_dim", "32", "16"]),
    (dict(q=torch.randn(5, 1, 16)), ShapeError, ["q_heads=5", "kv_heads=2"]),
    (dict(q=torch.randn(8, 1, 16).double()), ShapeError, ["q", "float64"]),
    (dict(k=torch.randn(3, 2, 4, 16).half()), ShapeError, ["k", "float16", "float32"]),
    (dict(block_mask=torch.ones(3, 2, dtype=torch.bool)), ShapeError, ["block_mask", "(3, 2)", "kv_heads=2"]),
    (dict(block_mask=torch.ones(2, 3)), ShapeError, ["block_mask", "float32"]),
    (dict(block_len=torch.full((4,), 4)), ShapeError, ["block_len", "(4,)", "n_blocks=3"]),
    (dict(block_len=torch.full((3,), 4.0)), ShapeError, ["block_len", "float32"]),
    (dict(block_len=[4, 4, 4]), ShapeError, ["block_len", "list"]),
    (dict(block_len=torch.full((3,), 4, device="meta")), ShapeError, ["block_len", "meta"]),
    (dict(impl="cuda"), ConfigError, ["impl", "'cuda'"]),
    (dict(causal_from=1.5), ConfigError, ["causal_from", "1.5"]),
])
def test_bad_inputs_name_the_argument(change, error, words):
    args = {**_valid_args(), **change}
    with pytest.raises(error) as info:
        block_sparse_attention(**args)
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


def test_triton_impl_needs_triton_and_cuda():
    """On CPU tensors impl='triton' refuses clearly; 'auto' runs the reference."""
    args = _valid_args()
    with pytest.raises(ConfigError, match="impl='triton' needs"):
        block_sparse_attention(**args, impl="triton")
    auto = block_sparse_attention(**args, impl="auto")
    ref = block_sparse_attention(**args, impl="torch")
    torch.testing.assert_close(auto, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("q_heads,kv_heads,head_dim,block_tokens,n_blocks,p_select", [
    (32, 8, 128, 64, 2048, 0.1),   # Llama-3-8B decode: 128K tokens, 10% selected
    (28, 4, 128, 16, 300, 0.3),    # GQA 7, short blocks
    (12, 4, 64, 48, 50, 0.5),      # GQA 3, non-power-of-two block
])
def test_triton_matches_torch_on_cuda(dtype, q_heads, kv_heads, head_dim, block_tokens, n_blocks, p_select):
    gen = torch.Generator().manual_seed(5)
    q, k, v, mask, lens = random_inputs(gen, dtype, q_heads, kv_heads, 1, n_blocks, block_tokens, head_dim,
                                        p_select, device="cuda")
    mask[0] = False                       # an empty selection
    lens[-1] = block_tokens + 7           # a fill past the block size counts as full
    scale = head_dim ** -0.5
    out, lse = block_sparse_attention(q, k, v, mask, lens, scale, impl="triton")
    ref_out, ref_lse = block_sparse_attention(q, k, v, mask, lens, scale, impl="torch")
    atol, rtol = TOL[dtype]
    assert out.dtype == dtype and out.is_cuda
    torch.testing.assert_close(out.float(), ref_out.float(), atol=atol, rtol=rtol)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=1e-3, rtol=1e-4)
    group = q_heads // kv_heads
    assert torch.all(out[:group] == 0)
    # Nothing selected anywhere: no launch, zeros and -inf.
    none = torch.zeros_like(mask)
    out, lse = block_sparse_attention(q, k, v, none, lens, scale, impl="triton")
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
