"""How fast is block-sparse decode attention? (GPU only.)

One decode step of a Llama-3-8B layer (32 query heads, 8 KV heads, head_dim 128, bf16, blocks of 64
tokens) over a cache of 32K..1M tokens of which 5% or 10% of the blocks are selected per KV head.
Timed on the same inputs:

- ``triton``: ``block_sparse_attention(impl="triton")``: plan + split kernel + merge, reading the selected
  blocks in place from the whole gathered cache;
- ``torch``: the torch reference (``impl="torch"``), which gathers the selected blocks and upcasts them;
- ``sdpa``: ``F.scaled_dot_product_attention`` over the same selected tokens already packed contiguous
  per KV head (the gather is not timed): the dense lower bound for attending to that many tokens.

Reports microseconds per call, the ratios to SDPA, and the K/V bytes read per second by the Triton
kernel; writes ``results/bench_kernels.json``.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from common import best_of, machine, parse_args, print_table, write_results
from tiercache.kernels.attention import block_sparse_attention, triton_available

Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK_TOKENS = 32, 8, 128, 64
CONTEXTS = [32 << 10, 128 << 10, 512 << 10, 1 << 20]
SELECTED = [0.05, 0.10]


def measure(context: int, share: float, dtype: torch.dtype, repeats: int) -> dict:
    """Time the three implementations for one context length (tokens) and selected share of blocks."""
    n_blocks = context // BLOCK_TOKENS
    q = torch.randn(Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=dtype)
    k = torch.randn(n_blocks, KV_HEADS, BLOCK_TOKENS, HEAD_DIM, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    lens = torch.full((n_blocks,), BLOCK_TOKENS, device="cuda", dtype=torch.int32)
    # The same number of blocks per KV head, so the SDPA baseline gets rectangular tensors.
    picked = max(1, round(share * n_blocks))
    chosen = torch.rand(KV_HEADS, n_blocks, device="cuda").topk(picked, dim=1).indices.sort(dim=1).values
    mask = torch.zeros(KV_HEADS, n_blocks, dtype=torch.bool, device="cuda").scatter_(1, chosen, True)
    scale = HEAD_DIM ** -0.5

    heads = torch.arange(KV_HEADS, device="cuda")[:, None]
    dense_k = k[chosen, heads].reshape(1, KV_HEADS, -1, HEAD_DIM)
    dense_v = v[chosen, heads].reshape(1, KV_HEADS, -1, HEAD_DIM)
    dense_q = q.reshape(1, Q_HEADS, 1, HEAD_DIM)

    def run_triton() -> None:
        block_sparse_attention(q, k, v, mask, lens, scale, impl="triton")

    def run_torch() -> None:
        block_sparse_attention(q, k, v, mask, lens, scale, impl="torch")

    def run_sdpa() -> None:
        F.scaled_dot_product_attention(dense_q, dense_k, dense_v, scale=scale, enable_gqa=True)

    times = {}
    for name, fn in (("triton", run_triton), ("torch", run_torch), ("sdpa", run_sdpa)):
        fn()  # compile / warm up
        times[name] = best_of(fn, repeats)
    kv_bytes = 2 * dense_k.numel() * dense_k.element_size()
    return {"context": context, "selected": share, "selected_tokens": picked * BLOCK_TOKENS,
            "triton_us": times["triton"] * 1e6, "torch_us": times["torch"] * 1e6,
            "sdpa_us": times["sdpa"] * 1e6, "triton/sdpa": times["triton"] / times["sdpa"],
            "torch/sdpa": times["torch"] / times["sdpa"], "triton_GB/s": kv_bytes / times["triton"] / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    ap.add_argument("--repeats", type=int, default=20)
    args = parse_args(ap)
    if not triton_available():
        sys.exit(f"bench_kernels needs a CUDA device and Triton (device here: {machine()['device']}).\n"
                 f"It would time one decode step of block-sparse attention ({Q_HEADS} query heads, "
                 f"{KV_HEADS} KV heads, head_dim {HEAD_DIM}, blocks of {BLOCK_TOKENS} tokens) at contexts "
                 f"{', '.join(f'{c >> 10}K' for c in CONTEXTS)} tokens with "
                 f"{', '.join(f'{s:.0%}' for s in SELECTED)} of the blocks selected: the Triton kernel, "
                 "the torch reference, and dense SDPA over the same selected tokens.")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    rows = [measure(context, share, dtype, args.repeats) for context in CONTEXTS for share in SELECTED]
    print_table(rows)
    write_results("bench_kernels", rows, dtype=args.dtype, q_heads=Q_HEADS, kv_heads=KV_HEADS,
                  head_dim=HEAD_DIM, block_tokens=BLOCK_TOKENS)


if __name__ == "__main__":
    main()
