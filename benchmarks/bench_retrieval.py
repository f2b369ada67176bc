"""How much of the attention that matters does a step read, at a read budget?

SmolLM2-135M-Instruct over 4K and 8K tokens of real prose: the post-RoPE queries of the last 8
prompt positions and of 8 greedy decode steps, and the key cache. Each variant (storage block and
unit size, summary, GQA aggregate, layers read in full, layers reusing another's selection,
per-layer budgets calibrated on the capture itself) selects blocks exactly as the decode step
does (``Selector.plan`` + ``Selector.select``, the budget counting sink, window and retrieved
blocks, whole blocks rounded down), and is scored by **recall of attention mass** (the share of
full attention's softmax weight that falls in the tokens read) and the **attention-output
error** (``|out^ - out| / |out|``), each without and with the estimate of the blocks not read
(``est_*``: every unread complete block as its mean key, weighted by its token count, with its
mean value; RetroInfer's estimation zone), where recall is the overlap ``sum_b min(p_b, p^_b)``
of full attention's block masses with the step's. ``read`` is the share of the cached tokens
actually read, averaged over steps and layers (the plans round down, so at most the budget). The
oracle picks, per layer and step, the blocks with the most mass at the same read count (sink
and window included): no selection of those blocks can do better. ``streaming_heads`` is the
share of query heads whose mass sink and window alone hold (>= 0.9): DuoAttention's streaming
heads, which a per-head budget could leave at sink + window.

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
from tiercache.config import RetrievalConfig, TierConfig
from tiercache.corpus import text_tokens
from tiercache.models import load_default_model
from tiercache.retrieval.selector import Selector
from tiercache.retrieval.summaries import make_summary
from tiercache.retrieval.evaluate import Capture, attention_probs, capture, read_attention

BUDGETS = (0.05, 0.1, 0.2)


@dataclass
class Variant:
    name: str
    block_tokens: int
    config: RetrievalConfig
    extra: dict = field(default_factory=dict)


def variants(only: str | None) -> list[Variant]:
    base = RetrievalConfig()  # the library's defaults
    bt = TierConfig(device_budget_bytes=1, host_budget_bytes=0).block_tokens
    out = [
        Variant(f"default: blocks {bt}", bt, base),
        Variant("blocks 16", 16, base),
        Variant("blocks 32", 32, base),
        Variant(f"blocks {bt}, units 4", bt, replace(base, unit_tokens=4)),
        Variant("blocks 16, units 4", 16, replace(base, unit_tokens=4)),
        Variant("softmax aggregate", bt, replace(base, gqa_aggregate="softmax")),
        Variant("sum aggregate", bt, replace(base, gqa_aggregate="sum")),
        Variant("mean-key summary", bt, replace(base, summary="mean")),
        Variant("sink 32, window 128", bt, replace(base, sink_tokens=32, window_tokens=128)),
        Variant("layers 0-1 full", bt, replace(base, full_attention_layers=(0, 1))),
        Variant("selection at layers 0, 2, 8, 16 (TidalDecode)", bt, replace(base, selection_layers=(0, 2, 8, 16))),
        Variant("calibrated layer budgets", bt, base, {"calibrate": True}),
    ]
    if only:
        out = [v for v in out if any(part in v.name for part in only.split("|"))]
    return out


def calibrated(cap: Capture, v: Variant, budget: float) -> RetrievalConfig:
    """Per-layer budgets from a calibration pass over ``cap`` itself (so at best optimistic): each
    layer's share of the total is proportional to the attention mass the uniform budget misses
    there, held between half and three times the uniform share, at the same mean."""
    uniform = score(cap, replace(v, extra={}), budget)["layer_recall"]
    miss = np.clip(1.0 - np.asarray(uniform), 1e-3, None)
    share = np.clip(miss / miss.mean(), 0.5, 3.0)
    share /= share.mean()
    return replace(v.config, budget=budget,
                   layer_budgets={layer: float(min(1.0, budget * w)) for layer, w in enumerate(share)})


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


def score(cap: Capture, v: Variant, budget: float) -> dict:
    """One variant at one budget over every layer and step of ``cap``."""
    kv_heads, _, head_dim = cap.keys[0].shape
    unit = v.config.unit_tokens or v.block_tokens
    summary = make_summary(v.config.summary)
    config = calibrated(cap, v, budget) if v.extra.get("calibrate") else replace(v.config, budget=budget)
    s = Selector(config, v.block_tokens, unit, summary, torch.device("cpu"))
    stats = {name: [] for name in ("recall", "error", "est_recall", "est_error", "oracle", "read", "streaming_heads")}
    n_layers = len(cap.keys)
    layer_recall = np.zeros(n_layers)
    chosen: dict[tuple[int, int], torch.Tensor] = {}  # (layer, step) -> blocks, for TidalDecode reuse
    start = time.perf_counter()
    for layer, keys_all in enumerate(cap.keys):
        whole = keys_all.shape[1] // unit * unit  # every complete unit of the final cache
        summaries = summary.summarize(keys_all[None, :, :whole].unflatten(2, (-1, unit)))
        source = None
        if config.selection_layers is not None and layer not in config.selection_layers:
            source = max((x for x in config.selection_layers if x < layer), default=None)
        for step, n in enumerate((cap.positions + 1).tolist()):
            plan = s.plan(layer, n)
            q = cap.queries[layer][step]
            if source is not None:
                blocks = chosen[source, step]
            else:  # a step scores only the units before it: later ones are masked by their validity
                blocks = s.select(plan, q.view(1, -1, 1, head_dim), summaries, None, cap.scaling)[0]
            chosen[layer, step] = blocks
            keys, values = keys_all[:, :n], cap.values[layer][:, :n]
            for prefix, estimate in (("", False), ("est_", True)):
                overlap, error = read_attention(q, keys, values, blocks, v.block_tokens, cap.scaling, estimate)
                stats[prefix + "recall"].append(float(overlap.mean()))
                stats[prefix + "error"].append(float(error.mean()))
            layer_recall[layer] += stats["recall"][-1] / cap.steps
            stats["read"].append(plan.read_tokens / n)
            probs = attention_probs(q, keys, cap.scaling)
            stats["oracle"].append(float(oracle_recall(probs, kv_heads, n, v.block_tokens, plan.read, plan.sink,
                                                       plan.window).mean()) if not plan.full else 1.0)
            # DuoAttention's streaming heads: heads whose mass sink and window alone hold (>= 0.9).
            edge = probs[:, : plan.sink * v.block_tokens].sum(-1) + probs[:, (plan.n_blocks - plan.window) * v.block_tokens :].sum(-1)
            stats["streaming_heads"].append(float((edge >= 0.9).float().mean()) if not plan.full else 0.0)
    return {"variant": v.name, "tokens": cap.keys[0].shape[1], "budget": budget,
            **{k: float(np.mean(x)) for k, x in stats.items()},
            "worst_layer": float(layer_recall.min()), "layer_recall": layer_recall.round(4).tolist(),
            "seconds": time.perf_counter() - start}


def run(cap: Capture, vs: list[Variant]) -> list[dict]:
    rows = []
    for v in vs:
        for b in BUDGETS:
            rows.append(score(cap, v, b))
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
                       "worst_layer", "streaming_heads"])
    write_results(args.out, rows, budgets=BUDGETS)


if __name__ == "__main__":
    main()
