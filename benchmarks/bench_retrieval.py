"""How well, and how fast, does block retrieval pick the attention that matters?

1. Real data: SmolLM2-135M-Instruct over 4K and 8K tokens of real prose; the post-RoPE queries of
   the last 8 prompt positions and of 8 greedy decode steps, and the key cache. For each
   retrieval variant (summary, block size, GQA aggregate, full-attention layers, layer reuse,
   index) and budget (5/10/20% of the context, sink and window counted): recall of attention
   mass, the prefetch predictor's hit rate, and selection time per step against dense attention
   time per step in the same run. Block and token oracles bound what any selection could reach.
   Blocks are sealed step by step as the context grows, as the decode path would.
2. Synthetic: a 1M-block layer (clustered vectors of dim 64); faiss IVF and HNSW against the exact
   scan: recall of the exact top-k and search time.

Prints tables and writes benchmarks/results/bench_retrieval.json. ``--quick``: 2K tokens, fewer
variants, a 100K-block synthetic layer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from tiercache.config import RetrievalConfig
from tiercache.corpus import text_tokens
from tiercache.models import load_default_model
from tiercache.retrieval import MeanSummary, Retriever, make_index
from tiercache.retrieval.evaluate import Capture, attention_probs, capture, mass_recall
from tiercache.retrieval.selector import Selection, storage_blocks

BUDGETS = (0.05, 0.1, 0.2)
SINK, WINDOW = 16, 64  # tokens: 1 block + 4 blocks of 16, as in DESIGN.md's first measurements
RESULTS = Path(__file__).parent / "results" / "bench_retrieval.json"


@dataclass
class Variant:
    name: str
    block_tokens: int
    config: RetrievalConfig
    boost: dict[int, float] = field(default_factory=dict)  # fixed budgets of some layers
    charged: bool = True  # boosted and full layers' tokens shrink the other layers' budgets
    storage: int | None = None  # decode reads these storage blocks (selector.storage_blocks), all heads


def variants(n_layers: int, quick: bool, only: str | None = None) -> list[Variant]:
    base = RetrievalConfig(sink_tokens=SINK, window_tokens=WINDOW, summary="minmax", gqa_aggregate="max")
    softmax = replace(base, gqa_aggregate="softmax")
    full = (0, 1)
    out = [
        Variant("minmax b16 max", 16, base),
        Variant("minmax b16 sum", 16, replace(base, gqa_aggregate="sum")),
        Variant("minmax b16 softmax", 16, replace(base, gqa_aggregate="softmax")),
        Variant("mean b16 max", 16, replace(base, summary="mean")),
        Variant("landmarks4 b16 max", 16, replace(base, summary="landmarks:4")),
        Variant("minmax b8 max", 8, base),
        Variant("minmax b8 softmax", 8, replace(base, gqa_aggregate="softmax")),
        Variant("minmax b4 softmax", 4, replace(base, gqa_aggregate="softmax")),
        Variant("minmax b4 softmax -> read 16-token blocks", 4, replace(base, gqa_aggregate="softmax"),
                storage=16),
        Variant("minmax b16 softmax -> read 16-token blocks", 16, replace(base, gqa_aggregate="softmax"),
                storage=16),
        Variant("minmax b8 max full0-1", 8, replace(base, full_attention_layers=full)),
        Variant("minmax b8 max full0-1 (uncharged)", 8, replace(base, full_attention_layers=full),
                charged=False),
        Variant("minmax b8 softmax boost0-1=30%", 8, softmax, boost={0: 0.3, 1: 0.3}),
        Variant("minmax b16 softmax boost0-1=30%", 16, softmax, boost={0: 0.3, 1: 0.3}),
        Variant("minmax b8 max tidal(sel 2,8,16)", 8,
                replace(base, full_attention_layers=full, selection_layers=(2, 8, 16))),
        Variant("minmax b8 max next_layer prefetch", 8, replace(base, prefetch="next_layer")),
        Variant("keys b1 (token top-k) max", 1, replace(base, summary="mean")),
        Variant("keys b1 (token top-k) softmax", 1, replace(base, summary="mean", gqa_aggregate="softmax")),
        Variant("keys b1 faiss IVF64 softmax", 1,
                replace(base, summary="mean", gqa_aggregate="softmax", index="faiss:IVF64,Flat|nprobe=8")),
        Variant("mean b16 faiss HNSW32", 16, replace(base, summary="mean", index="faiss:HNSW32|efSearch=64")),
    ]
    if quick:
        keep = ("minmax b16 max", "minmax b16 sum", "minmax b8 max", "minmax b8 max full0-1", "minmax b4 softmax",
                "minmax b4 softmax -> read 16-token blocks", "minmax b16 softmax -> read 16-token blocks",
                "keys b1 (token top-k) softmax", "keys b1 faiss IVF64 softmax")
        out = [v for v in out if v.name in keep]
    if only:
        out = [v for v in out if any(part in v.name for part in only.split("|"))]
    return out


def layer_budgets(v: Variant, budget: float, n_layers: int) -> dict[int, float] | None:
    """Per-layer budgets of a variant at ``budget``. Charged variants keep the mean over layers at
    ``budget``: full layers (1.0) and boosted ones take their share first, the rest split what is
    left; None when nothing is left (the row reports n/a)."""
    fixed = {layer: 1.0 for layer in v.config.full_attention_layers} | v.boost
    if not v.charged or not fixed:
        return dict(v.boost)
    rest = (n_layers * budget - sum(fixed.values())) / (n_layers - len(fixed))
    if rest <= 0:
        return None
    return {layer: fixed.get(layer, min(rest, 1.0)) for layer in range(n_layers)}


def oracle_recall(
    probs: torch.Tensor, kv_heads: int, n_tokens: int, bt: int, budget_tokens: int
) -> torch.Tensor:
    """Best recall of any selection of ``bt``-token blocks (sink and window included) within the
    budget: per KV head, the blocks with the most attention mass summed over the group."""
    group = probs.shape[0] // kv_heads
    n_blocks = math.ceil(n_tokens / bt)
    pad = n_blocks * bt - n_tokens
    per_block = F.pad(probs, (0, pad)).reshape(kv_heads, group, n_blocks, bt).sum(-1)  # (h, g, n)
    sink, window = math.ceil(SINK / bt), math.ceil(WINDOW / bt)
    mass = per_block.sum(1)
    fixed = torch.zeros(n_blocks, dtype=torch.bool)
    fixed[:sink] = True
    fixed[n_blocks - window :] = True
    top = max(0, budget_tokens // bt - sink - window)
    chosen = mass.masked_fill(fixed, float("-inf")).topk(top, dim=-1).indices
    mask = fixed.expand(kv_heads, n_blocks).clone().scatter_(1, chosen, True)
    return (per_block * mask.unsqueeze(1)).sum(-1).reshape(-1)


def touched_blocks(mask: torch.Tensor, unit: int, n_tokens: int, storage: int) -> float:
    """Share of ``storage``-token blocks holding at least one token of a selection of ``unit``-token
    units ``(kv_heads, n_units)``, averaged over KV heads: what must be resident to serve it."""
    tokens = mask.repeat_interleave(unit, dim=1)[:, :n_tokens]
    tokens = F.pad(tokens, (0, -n_tokens % storage)).reshape(mask.shape[0], -1, storage)
    return tokens.any(-1).float().mean()


def read_blocks(sel: Selection, unit: int, storage: int, n_tokens: int) -> Selection:
    """What decode attends for a selection of ``unit``-token units: every token, for every KV
    head, of the ``storage``-token blocks that ``storage_blocks`` reads (sink and window forced)."""
    per_block = storage // unit
    n_units = math.ceil(n_tokens / unit)
    window = range(max(0, n_units - math.ceil(WINDOW / unit)), n_units)
    forced = torch.tensor(sorted({u // per_block for u in [*range(math.ceil(SINK / unit)), *window]}))
    chosen = storage_blocks(sel.ranked, per_block, math.ceil(n_tokens / storage), forced,
                            math.ceil(sel.k / per_block))
    indices = chosen.expand(sel.indices.shape[0], -1)
    return Selection(indices, indices, math.ceil(n_tokens / storage), indices)


def run_real(cap: Capture, prompt_tokens: int, quick: bool, only: str | None = None) -> dict:
    n_layers = len(cap.keys)
    kv_heads, _, head_dim = cap.keys[0].shape
    q_heads = cap.queries[0].shape[1]
    runs = []  # (variant, budget, retriever)
    vs = variants(n_layers, quick, only)
    for v in vs:
        for b in BUDGETS:
            lb = layer_budgets(v, b, n_layers)
            if lb is None:
                continue
            cfg = replace(v.config, budget=b, layer_budgets=lb)
            r = Retriever(cfg, n_layers, kv_heads, head_dim, v.block_tokens, scaling=cap.scaling)
            runs.append((v, b, r, {"recall": [], "layer_recall": np.zeros(n_layers), "tokens": 0.0,
                                   "touched16": 0.0, "select_s": 0.0, "sealed": [0] * n_layers}))
    oracle_units = {"oracle blocks of 16": 16, "oracle blocks of 8": 8, "oracle tokens": 1}
    oracles = {(name, b): [] for name in oracle_units for b in BUDGETS}
    dense_s = 0.0
    for step in range(cap.steps):
        n = int(cap.positions[step]) + 1
        for layer in range(n_layers):
            q = cap.queries[layer][step]
            keys = cap.keys[layer][:, :n]
            t0 = time.perf_counter()
            F.scaled_dot_product_attention(
                q.view(1, q_heads, 1, head_dim), keys.unsqueeze(0), keys.unsqueeze(0),
                scale=cap.scaling, enable_gqa=True,
            )
            dense_s += time.perf_counter() - t0
            probs = attention_probs(q, keys, cap.scaling)
            for b in BUDGETS:
                bt_tokens = math.floor(b * n)
                for name, unit in oracle_units.items():
                    oracles[(name, b)].append(oracle_recall(probs, kv_heads, n, unit, bt_tokens).mean())
            for v, b, r, st in runs:
                bt = v.block_tokens
                sealed = n // bt
                if sealed > st["sealed"][layer]:
                    first = st["sealed"][layer]
                    r.seal(0, layer, first, keys[:, first * bt : sealed * bt])
                    st["sealed"][layer] = sealed
                t0 = time.perf_counter()
                sel = r.select(0, layer, q, n)
                if v.storage:
                    sel, bt = read_blocks(sel, bt, v.storage, n), v.storage
                st["select_s"] += time.perf_counter() - t0
                rec = float(mass_recall(probs, sel, bt).mean())
                st["recall"].append(rec)
                st["layer_recall"][layer] += rec / cap.steps
                share = 1.0 / (cap.steps * n_layers)
                st["tokens"] += min(n, sel.k * bt) / n * share
                st["touched16"] += float(touched_blocks(sel.mask(), bt, n, 16)) * share
    rows = {}
    steps = cap.steps * n_layers
    for v, b, r, st in runs:
        row = rows.setdefault(v.name, {"block_tokens": v.block_tokens, "config": _describe(v)})
        row[f"recall@{b}"] = float(np.mean(st["recall"]))
        row[f"worst_layer@{b}"] = float(st["layer_recall"].min())
        row[f"attended@{b}"] = st["tokens"]
        row[f"touched16@{b}"] = st["touched16"]
        row[f"layer_recall@{b}"] = st["layer_recall"].round(4).tolist()
        row[f"prefetch_hit@{b}"] = r.predictor.hit_rate
        row[f"select_vs_dense@{b}"] = st["select_s"] / dense_s
    for (name, b), vals in oracles.items():
        rows.setdefault(name, {})[f"recall@{b}"] = float(torch.stack(vals).mean())
        rows[name][f"attended@{b}"] = b
    return {"tokens": prompt_tokens, "steps": cap.steps, "dense_us_per_layer_step": dense_s / steps * 1e6,
            "rows": rows}


def _describe(v: Variant) -> dict:
    c = v.config
    return {"summary": c.summary, "index": c.index, "gqa_aggregate": c.gqa_aggregate,
            "full_attention_layers": list(c.full_attention_layers), "boost": v.boost, "charged": v.charged,
            "selection_layers": list(c.selection_layers or []), "prefetch": c.prefetch}


def run_synthetic(n_blocks: int, k: int = 64, n_queries: int = 20) -> dict:
    """faiss IVF / HNSW against the exact scan on one KV head of ``n_blocks`` mean-key summaries.

    Like real keys (low-rank and clustered; ShadowKV factorises them at low rank), the vectors are
    4096 cluster centres in a random 16-dim subspace of the 64 dims, plus isotropic noise of 0.3
    per dim; queries are more such vectors.
    """
    gen = torch.Generator().manual_seed(0)
    d, rank = 64, 16
    basis = torch.linalg.qr(torch.randn(d, rank, generator=gen))[0].T  # (rank, d)
    centres = torch.randn(4096, rank, generator=gen) @ basis

    def draw(n: int) -> torch.Tensor:
        return centres[torch.randint(0, 4096, (n,), generator=gen)] + 0.3 * torch.randn(n, d, generator=gen)

    data, queries = draw(n_blocks), draw(n_queries)
    summaries = data.view(n_blocks, 1, 1, d)
    nlist = 1024 if n_blocks >= 500_000 else 256
    # (factory, search parameters to sweep on the one built index)
    specs = [("exact", [""]), (f"faiss:IVF{nlist},Flat", ["nprobe=8", "nprobe=16", "nprobe=32", "nprobe=64"]),
             ("faiss:HNSW32", ["efSearch=64", "efSearch=128", "efSearch=256", "efSearch=512"])]
    out, truth, exact_s = {}, None, None
    for spec, sweep in specs:
        index = make_index(spec, MeanSummary(), 1, d)
        t0 = time.perf_counter()
        index.add(range(n_blocks), summaries)
        if spec != "exact":  # build now, on every core, so that search time excludes building
            faiss.omp_set_num_threads(os.cpu_count() or 1)
            index.sync()
            faiss.omp_set_num_threads(1)
        build_s = time.perf_counter() - t0
        for params in sweep:
            if params:
                index.tune(params)
            found, t_search = [], 0.0
            for q in queries:
                t0 = time.perf_counter()
                found.append(index.search(q.view(1, 1, d), k, "max", d**-0.5, (0, n_blocks))[0])
                t_search += time.perf_counter() - t0
            if spec == "exact":
                truth, exact_s = found, t_search
            recall = float(np.mean([np.isin(f.numpy(), t.numpy()).mean() for f, t in zip(found, truth)]))
            name = f"{spec}|{params}" if params else spec
            out[name] = {"recall_of_exact_topk": recall, "search_ms": t_search / n_queries * 1e3,
                         "speedup_vs_exact": exact_s / t_search, "build_s": build_s}
            print(f"  {name:34s} recall {recall:.3f}  search {t_search / n_queries * 1e3:8.2f} ms  "
                  f"x{exact_s / t_search:6.1f} vs exact  build {build_s:6.1f} s", flush=True)
    return {"n_blocks": n_blocks, "k": k, "queries": n_queries, "indexes": out}


def print_table(res: dict) -> None:
    print(f"\n== {res['tokens']} tokens, {res['steps']} steps x 30 layers; recall of attention mass "
          f"(columns after r@20% at budget 10%) ==")
    print("attended: share of tokens read; touch16: share of 16-token storage blocks holding a selected "
          "token; prefetch: previous-step guess hit rate; sel/dense: selection time / dense attention time")
    head = (f"{'variant':38s} {'r@5%':>6s} {'r@10%':>6s} {'r@20%':>6s} {'worst@10':>8s} {'attended':>8s} "
            f"{'touch16':>7s} {'prefetch':>8s} {'sel/dense':>9s}")
    print(head)
    for name, row in res["rows"].items():
        def f(key, fmt="{:.3f}"):
            return fmt.format(row[key]) if key in row else "n/a"
        print(f"{name:38s} {f('recall@0.05'):>6s} {f('recall@0.1'):>6s} {f('recall@0.2'):>6s} "
              f"{f('worst_layer@0.1'):>8s} {f('attended@0.1'):>8s} {f('touched16@0.1'):>7s} "
              f"{f('prefetch_hit@0.1'):>8s} {f('select_vs_dense@0.1', '{:.2f}'):>9s}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2K tokens, few variants, 100K synthetic blocks")
    parser.add_argument("--only", help="run only the variants whose name contains one of these '|'-separated texts")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON file to write")
    parser.add_argument("--no-synthetic", action="store_true", help="skip the synthetic faiss layer")
    args = parser.parse_args()
    torch.manual_seed(0)
    # One thread for torch and faiss alike: on a small shared machine, thread oversubscription
    # would swamp the ratios (selection vs dense, faiss vs exact) this benchmark reports.
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    model, tokenizer = load_default_model()
    contexts = (2048,) if args.quick else (4096, 8192)
    results = {"model": "SmolLM2-135M-Instruct", "sink_tokens": SINK, "window_tokens": WINDOW,
               "budgets": BUDGETS, "real": [], "synthetic": None}
    for n in contexts:
        t0 = time.perf_counter()
        cap = capture(model, text_tokens(tokenizer, n), last_positions=8, decode_steps=8)
        print(f"captured {n} tokens in {time.perf_counter() - t0:.1f} s", flush=True)
        res = run_real(cap, n, args.quick, args.only)
        print_table(res)
        results["real"].append(res)
    if not args.no_synthetic:
        n_blocks = 100_000 if args.quick else 1_000_000
        print(f"\n== synthetic layer of {n_blocks} blocks, top-64, faiss vs exact scan (same process) ==")
        results["synthetic"] = run_synthetic(n_blocks)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
