"""How fast are the decode step's kernels? (GPU only.)

One decode step of a Llama-3-8B layer (32 query heads, 8 KV heads, head_dim 128, bf16, blocks of
64 tokens) over a cache of 32K..1M tokens of which 5% or 10% of the blocks are read, all on the
device. Timed on the same inputs:

- ``triton``: ``paged_attention(impl="triton")``: flash-decoding reading the blocks in place from
  the device slab through their slots, plus the log-sum-exp merge of its splits;
- ``torch``: the reference (``impl="torch"``), which gathers the blocks and upcasts them;
- ``sdpa``: ``F.scaled_dot_product_attention`` over the same tokens already packed contiguous
  (the gather is not timed): dense attention over that many tokens, the lower bound.
- ``gather``: ``kernels.rows.gather_rows`` of the same blocks from pinned host memory into the
  device (the copy a step pays for blocks that miss), against ``tensor.to("cuda")`` of the same
  bytes packed contiguous.

Reports microseconds per call, ratios, and bytes read per second; writes
``results/bench_kernels.json``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from common import best_of, machine, parse_args, print_table, write_results
from tiercache.kernels.attention import paged_attention, triton_available
from tiercache.kernels.rows import gather_rows

Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK_TOKENS = 32, 8, 128, 64
CONTEXTS = [32 << 10, 128 << 10, 512 << 10, 1 << 20]
SELECTED = [0.05, 0.10]


def measure(context: int, share: float, dtype: torch.dtype, repeats: int) -> dict:
    """Time the implementations for one context length (tokens) and share of blocks read."""
    read = max(1, round(share * context / BLOCK_TOKENS))
    slots = read + 1
    q = torch.randn(1, Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=dtype)
    slab = torch.randn(slots, BLOCK_TOKENS, 2, KV_HEADS, HEAD_DIM, device="cuda", dtype=dtype)
    order = torch.randperm(read, device="cuda")[None]
    bias = torch.zeros(1, read, BLOCK_TOKENS, device="cuda", dtype=dtype)
    scale = HEAD_DIM ** -0.5
    kv = slab[order[0]]
    dense_k = kv[:, :, 0].reshape(1, -1, KV_HEADS, HEAD_DIM).transpose(1, 2).contiguous()
    dense_v = kv[:, :, 1].reshape(1, -1, KV_HEADS, HEAD_DIM).transpose(1, 2).contiguous()
    host = slab.cpu().pin_memory()
    packed = host[: read].contiguous().pin_memory()
    rows = torch.arange(read, device="cuda")
    runs = {
        "triton": lambda: paged_attention(q, slab, order, bias, scale, impl="triton", lse=False),
        "torch": lambda: paged_attention(q, slab, order, bias, scale, impl="torch", lse=False),
        "sdpa": lambda: F.scaled_dot_product_attention(q, dense_k, dense_v, scale=scale, enable_gqa=True),
        "gather": lambda: gather_rows(host, rows),
        "copy": lambda: packed.to("cuda", non_blocking=False),
    }
    times = {}
    for name, fn in runs.items():
        fn()  # compile / warm up
        times[name] = best_of(fn, repeats)
    kv_bytes = 2 * dense_k.numel() * dense_k.element_size()
    return {"context": context, "read": share, "read_tokens": read * BLOCK_TOKENS,
            **{f"{k}_us": v * 1e6 for k, v in times.items()},
            "triton/sdpa": times["triton"] / times["sdpa"], "torch/sdpa": times["torch"] / times["sdpa"],
            "triton_GB/s": kv_bytes / times["triton"] / 1e9, "gather/copy": times["gather"] / times["copy"],
            "gather_GB/s": kv_bytes / times["gather"] / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    ap.add_argument("--repeats", type=int, default=20)
    args = parse_args(ap)
    if not triton_available():  # nothing to time here, and nothing wrong: exit 0
        print(f"skipped: bench_kernels needs a CUDA device and Triton (device here: {machine()['device']}). It times "
              f"one decode step of paged attention ({Q_HEADS} query heads, {KV_HEADS} KV heads, head_dim "
              f"{HEAD_DIM}, blocks of {BLOCK_TOKENS} tokens) at {', '.join(f'{c >> 10}K' for c in CONTEXTS)} "
              f"tokens reading {', '.join(f'{s:.0%}' for s in SELECTED)} of the blocks.")
        return
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    rows = [measure(context, share, dtype, args.repeats) for context in CONTEXTS for share in SELECTED]
    print(f"paged decode attention and host-to-device gathers on {machine()['device']}")
    print_table(rows)
    write_results("bench_kernels", rows, dtype=args.dtype, q_heads=Q_HEADS, kv_heads=KV_HEADS,
                  head_dim=HEAD_DIM, block_tokens=BLOCK_TOKENS)


if __name__ == "__main__":
    main()
