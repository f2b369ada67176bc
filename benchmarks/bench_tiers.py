"""Block movement throughput between the device and host tiers, against one plain copy.

For blocks of 64 tokens in two model shapes, times ``TierManager.promote`` (host to device) and
``TierManager.demote`` (device to host) of N blocks, and one ``tensor.to(..., copy=True)`` of the
same number of bytes in the same direction (from pinned memory when CUDA is present). Reports the
ratio of throughputs (1.0 = as fast as the plain copy). Target on a GPU: >= 0.8 host to device.

    python benchmarks/bench_tiers.py [--blocks N] [--repeats R]
"""

from __future__ import annotations

import argparse

import torch

from common import best_of, machine, parse_args, print_table, write_results
from tiercache import BlockKey, BlockLayout, TierConfig, TierName
from tiercache.manager import TierManager

SHAPES = {"smollm2-135m": (3, 64), "llama3-8b": (8, 128)}  # (kv_heads, head_dim)


def measure(name: str, kv_heads: int, head_dim: int, n: int, repeats: int, dtype: torch.dtype) -> dict:
    layout = BlockLayout(kv_heads, 64, head_dim, dtype)
    cfg = TierConfig(device_budget_bytes=n * layout.nbytes, host_budget_bytes=n * layout.nbytes,
                     block_tokens=64, dtype=dtype)
    m = TierManager(cfg, layout)
    keys = [BlockKey(0, 0, i) for i in range(n)]
    kv = torch.randn((n, 2, *layout.shape), dtype=dtype, device=cfg.device)
    for key, b in zip(keys, kv):
        m.put(key, b[0], b[1])

    t_down = min(_timed_move(m, keys, "demote") for _ in range(repeats))
    t_up = min(_timed_move(m, keys, "promote") for _ in range(repeats))
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


def _timed_move(m: TierManager, keys: list[BlockKey], direction: str) -> float:
    """Seconds for one ``demote`` (all keys on the device) or ``promote`` (all on the host)."""
    if direction == "demote":
        m.promote(keys)
        return best_of(lambda: m.demote(keys), 1)
    m.demote([k for k in keys if m.meta(k).tier is TierName.DEVICE])
    return best_of(lambda: m.promote(keys), 1)


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
