"""How much of the attention that matters does a step read, at a read budget?

SmolLM2-135M-Instruct over 4K and 8K tokens of real prose: the post-RoPE queries of the last 8
prompt positions and of 8 greedy decode steps, and the key cache. Each variant (storage block and
unit size, summary, GQA aggregate, layers read in full) selects blocks exactly as the decode step
does (``Selector.plan`` + ``Selector.select``, the budget counting sink, window and retrieved
blocks, whole blocks rounded down), and is scored by **recall of attention mass** (the share of
full attention's softmax weight that falls in the tokens read) and the **attention-output
error** (``|out^ - out| / |out|``), each without and with the estimate of the blocks not read
(``est_*``: every unread complete block as its mean key, weighted by its token count, with its
mean value; RetroInfer's estimation zone), where recall is the overlap ``sum_b min(p_b, p^_b)``
of full attention's block masses with the step's. ``read`` is the share of the cached tokens
actually read, averaged over steps and layers (the plans round down, so at most the budget). The
oracle picks, per layer and step, the blocks with the most mass at the same read count (sink
and window included): no selection of those blocks can do better.

Prints tables and writes benchmarks/results/bench_retrieval.json. ``--quick``: 2K tokens, the
default variants only.

    OMP_NUM_THREADS=1 python benchmarks/bench_retrieval.py [--quick] [--only TEXT|TEXT]
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from common import machine, parse_args, print_table, write_results
from tiercache.config import RetrievalConfig
from tiercache.corpus import text_tokens
from tiercache.models import load_default_model
from tiercache.retrieval import Selector, make_summary
from tiercache.retrieval.evaluate import Capture, attention_probs, capture, read_attention

BUDGETS = (0.05, 0.1, 0.2)


@dataclass
class Variant:
    name: str
    block_tokens: int
    config: RetrievalConfig
    extra: dict = field(default_factory=dict)


def variants(only: str | None) -> list[Variant]:
    base = RetrievalConfig()  # the library's defaults: sink 32, window 128, minmax, softmax, 4-token units
    out = [
        Variant("default: blocks 32, units 4", 32, base),
        Variant("blocks 32, units 8", 32, replace(base, unit_tokens=8)),
        Variant("blocks 32, units 16", 32, replace(base, unit_tokens=16)),
        Variant("blocks 32, units 32", 32, replace(base, unit_tokens=32)),
        Variant("blocks 16, units 4", 16, base),
        Variant("blocks 16, units 16", 16, replace(base, unit_tokens=16)),
        Variant("blocks 8, units 4", 8, base),
        Variant("blocks 8, units 8", 8, replace(base, unit_tokens=8)),
        Variant("blocks 32, units 4, max aggregate", 32, replace(base, gqa_aggregate="max")),
        Variant("blocks 32, units 4, mean summary", 32, replace(base, summary="mean")),
        Variant("blocks 32, units 4, sink 16 window 64", 32, replace(base, sink_tokens=16, window_tokens=64)),
        Variant("blocks 32, units 4, layers 0-1 full", 32, replace(base, full_attention_layers=(0, 1))),
    ]
    if only:
        out = [v for v in out if any(part in v.name for part in only.split("|"))]
    return out


def oracle_recall(probs: torch.Tensor, kv_heads: int, n_tokens: int, bt: int, read: int, sink: int,
                  window: int) -> torch.Tensor:
    """Recall of the ``read`` blocks of ``bt`` tokens with the most mass summed over every query
    head (a block holds every head), sink and window forced: ``(q_heads,)``."""
    n_blocks = math.ceil(n_tokens / bt)
    per_block = torch.nn.functional.pad(probs, (0, n_blocks * bt - n_tokens)).view(probs.shape[0], n_blocks, bt).sum(-1)
    mass = per_block.sum(0)
    mass[:sink] = float("inf")
    mass[n_blocks - window :] = float("inf")
    chosen = mass.topk(min(read, n_blocks)).indices
    return per_block[:, chosen].sum(-1)


def run(cap: Capture, vs: list[Variant]) -> list[dict]:
    n_layers = len(cap.keys)
    kv_heads, _, head_dim = cap.keys[0].shape
    cpu = torch.device("cpu")
    rows = []
    for v in vs:
        unit = v.config.unit_tokens or v.block_tokens
        summary = make_summary(v.config.summary)
        summaries = []
        for keys in cap.keys:  # every complete unit of the final cache; a step scores those before it
            whole = keys.shape[1] // unit * unit
            summaries.append(summary.summarize(keys[None, :, :whole].unflatten(2, (-1, unit))))
        for b in BUDGETS:
            s = Selector(replace(v.config, budget=b), v.block_tokens, unit, summary, cpu)
            stats = {name: [] for name in ("recall", "error", "est_recall", "est_error", "oracle", "read")}
            layer_recall = np.zeros(n_layers)
            start = time.perf_counter()
            for layer in range(n_layers):
                for step, n in enumerate((cap.positions + 1).tolist()):
                    plan = s.plan(layer, n)
                    q = cap.queries[layer][step]
                    blocks = s.select(plan, q.view(1, -1, 1, head_dim), summaries[layer], None, cap.scaling)[0]
                    keys, values = cap.keys[layer][:, :n], cap.values[layer][:, :n]
                    for prefix, estimate in (("", False), ("est_", True)):
                        overlap, error = read_attention(q, keys, values, blocks, v.block_tokens, cap.scaling, estimate)
                        stats[prefix + "recall"].append(float(overlap.mean()))
                        stats[prefix + "error"].append(float(error.mean()))
                    layer_recall[layer] += stats["recall"][-1] / cap.steps
                    stats["read"].append(plan.read_tokens / n)
                    probs = attention_probs(q, keys, cap.scaling)
                    stats["oracle"].append(float(oracle_recall(probs, kv_heads, n, v.block_tokens, plan.read, plan.sink,
                                                               plan.window).mean()) if not plan.full else 1.0)
            rows.append({"variant": v.name, "tokens": cap.keys[0].shape[1], "budget": b,
                         **{k: float(np.mean(x)) for k, x in stats.items()},
                         "worst_layer": float(layer_recall.min()), "layer_recall": layer_recall.round(4).tolist(),
                         "seconds": time.perf_counter() - start})
            print({k: v_ for k, v_ in rows[-1].items() if k != "layer_recall"}, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2K tokens, the default variants only")
    ap.add_argument("--only", help="run only the variants whose name contains one of these '|'-separated texts")
    ap.add_argument("--contexts", default=None, help="comma-separated token counts (default 4096,8192)")
    ap.add_argument("--out", default="bench_retrieval")
    args = parse_args(ap)
    torch.manual_seed(0)
    model, tokenizer = load_default_model()
    contexts = [int(c) for c in args.contexts.split(",")] if args.contexts else ([2048] if args.quick else [4096, 8192])
    vs = variants("default" if args.quick else args.only)
    rows = []
    for n in contexts:
        cap = capture(model, text_tokens(tokenizer, n), last_positions=8, decode_steps=8)
        rows += run(cap, vs)
    print(f"\nrecall of attention mass at a read budget, SmolLM2-135M, on {machine()['device']}")
    print_table(rows, ["variant", "tokens", "budget", "read", "recall", "est_recall", "oracle", "error", "est_error",
                       "worst_layer"])
    write_results(args.out, rows, budgets=BUDGETS)


if __name__ == "__main__":
    main()
