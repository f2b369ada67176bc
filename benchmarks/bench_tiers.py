"""Block movement throughput between host memory and the device, against one plain copy.

For blocks of 64 tokens in two model shapes, times
- host to device: ``TierManager.resident`` of N blocks that all miss (two sets of N blocks take
  turns in N device slots), the decode step's gather-and-copy;
- device to host: ``TierManager.seal`` of N blocks, the write-through of sealed blocks;
and one ``tensor.to(..., copy=True)`` of the same number of bytes in the same direction (from
pinned memory when CUDA is present). Reports the ratio of throughputs (1.0 = as fast as the
plain copy). Target on a GPU: >= 0.8 host to device.

    python benchmarks/bench_tiers.py [--blocks N] [--repeats R]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from common import best_of, machine, parse_args, print_table, write_results
from tiercache import BlockLayout, TierConfig
from tiercache.tiers.manager import TierManager

SHAPES = {"smollm2-135m": (3, 64), "llama3-8b": (8, 128)}  # (kv_heads, head_dim)


def measure(name: str, kv_heads: int, head_dim: int, n: int, repeats: int, dtype: torch.dtype) -> dict:
    layout = BlockLayout(kv_heads, 64, head_dim, dtype)
    cfg = TierConfig(device_budget_bytes=n * layout.nbytes, host_budget_bytes=2 * n * layout.nbytes,
                     block_tokens=64, dtype=dtype)
    m = TierManager(cfg, layout, layers=1)
    m.reserve(2 * n)
    kv = torch.randn((2 * n, 64, 2, kv_heads, head_dim), dtype=dtype, device=cfg.device)
    m.seal(0, np.arange(2 * n), kv)
    sets = [torch.arange(n, device=cfg.device), torch.arange(n, 2 * n, device=cfg.device)]
    turn = [0]

    def up():
        turn[0] ^= 1
        m.resident(0, sets[turn[0]])

    up()
    t_up = best_of(up, repeats)
    misses = m.stats().device_misses
    assert misses == (repeats + 1) * n, "every timed call must miss all its blocks"
    t_down = best_of(lambda: m.seal(0, np.arange(n), kv[:n]), repeats)
    nbytes = n * layout.nbytes
    pin = torch.cuda.is_available()
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=cfg.device)
    base_up = best_of(lambda: dev.copy_(host, non_blocking=False) if pin else host.to(cfg.device, copy=True), repeats)
    base_down = best_of(lambda: host.copy_(dev) if pin else dev.to("cpu", copy=True), repeats)
    m.close()
    return {
        "shape": name, "block_kib": layout.nbytes / 1024, "blocks": n, "MiB": nbytes / 2**20,
        "h2d_GBps": nbytes / t_up / 1e9, "h2d_plain_GBps": nbytes / base_up / 1e9, "h2d_ratio": base_up / t_up,
        "d2h_GBps": nbytes / t_down / 1e9, "d2h_plain_GBps": nbytes / base_down / 1e9, "d2h_ratio": base_down / t_down,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=256, help="blocks moved per operation")
    ap.add_argument("--repeats", type=int, default=5)
    args = parse_args(ap)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float16
    rows = [measure(name, h, d, args.blocks, args.repeats, dtype) for name, (h, d) in SHAPES.items()]
    print(f"block movement vs one plain copy of the same bytes on {machine()['device']}")
    print_table(rows)
    write_results("bench_tiers", rows, blocks=args.blocks, block_tokens=64)


if __name__ == "__main__":
    main()
