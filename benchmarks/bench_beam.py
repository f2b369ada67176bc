"""What beam search's cache reorder costs when beams share blocks (TieredCache, copy-on-write of the
open block) against copying whole caches (DynamicCache), in one run on the same model and prompt.

Model: the 8-layer Llama shape of bench_decode_overhead (hidden 256, 8 query and 2 KV heads,
random weights, fp32). For each context and beam count, ``generate(num_beams=...)`` runs once per
cache, and every ``reorder_cache`` call is measured (the first, which forks the beams from the
prompt, and the later ones alike):

- ``kv_bytes_per_step``: KV bytes a reorder copies. DynamicCache: its key and value tensors, which
  ``index_select`` writes anew for every row; TieredCache: the open blocks of rows that now share
  one (``moved_bytes["device->device"]``); full blocks are shared, never copied;
- ``summary_bytes_per_step``: TieredCache's unit summaries, which are kept per row and gathered
  (``UnitIndex.reorder``);
- ``estimate_bytes_per_step``: TieredCache's block estimates (mean keys and values, log counts),
  also per row and gathered (``BlockEstimates.reorder``);
- ``kv_vs_dynamic``: TieredCache's KV bytes over DynamicCache's; ``all_vs_dynamic`` with the
  summaries and estimates included;
- ``reorder_ms``: median wall time of one reorder;
- ``same_tokens``: whether both caches give the same beams (a full retrieval budget is exact).

    OMP_NUM_THREADS=1 python benchmarks/bench_beam.py [--contexts 1024,4096] [--beams 2,4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache, LlamaForCausalLM

from common import TINY_LLAMA, machine, parse_args, print_table, random_llama, write_results
from tiercache import RetrievalConfig, TierConfig
from tiercache.hf.cache import TieredCache
from tiercache.spec import kv_bytes_per_token

def build() -> LlamaForCausalLM:
    model = random_llama(TINY_LLAMA, max_position_embeddings=1 << 16)
    model.generation_config.eos_token_id = None  # every beam runs to max_new_tokens
    model.generation_config.pad_token_id = 0
    return model


def watch(cache) -> list[dict]:
    """Wrap ``cache.reorder_cache`` so that each call appends its bytes and seconds to the list."""
    calls: list[dict] = []
    reorder = cache.reorder_cache

    def timed(beam_idx: torch.Tensor) -> None:
        if isinstance(cache, TieredCache):
            before, index = cache.manager.stats().moved_bytes.get("device->device", 0), cache.step.kv.index.data
            estimates = cache.step.kv.estimates.keys if cache.step.kv.estimates is not None else None
        else:
            dense = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
        start = time.perf_counter()
        reorder(beam_idx)
        seconds = time.perf_counter() - start
        if isinstance(cache, TieredCache):
            kv = cache.manager.stats().moved_bytes.get("device->device", 0) - before
            gathered = cache.step.kv.index.data is not index  # an identity reorder gathers nothing
            summaries = sum(d.nbytes for d in cache.step.kv.index.data) + cache.step.kv.index.bias.nbytes if gathered else 0
            est = cache.step.kv.estimates
            means = (sum(t.nbytes for t in est.keys + est.values) + est.log_count.nbytes
                     if est is not None and est.keys is not estimates else 0)
            calls.append({"kv": kv, "summaries": summaries, "estimates": means, "seconds": seconds})
        else:
            calls.append({"kv": dense, "summaries": 0, "estimates": 0, "seconds": seconds})

    cache.reorder_cache = timed
    return calls


def run(model, context: int, beams: int, new_tokens: int, budget: float, device_fraction: float) -> list[dict]:
    ids = torch.randint(1, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(context))
    total = kv_bytes_per_token(model) * beams * (context + new_tokens)
    config = TierConfig(device_budget_bytes=int(total * device_fraction), host_budget_bytes=2 * total,
                        block_tokens=32, dtype=torch.float32, device="cpu", retrieval=RetrievalConfig(budget=budget))
    rows, outputs = [], {}
    for kind in ("dynamic", "tiercache"):
        cache = DynamicCache(config=model.config) if kind == "dynamic" else TieredCache(model, config)
        calls = watch(cache)
        start = time.perf_counter()
        outputs[kind] = model.generate(ids, past_key_values=cache, num_beams=beams, max_new_tokens=new_tokens,
                                       do_sample=False)
        rows.append({"kind": kind, "context": context, "beams": beams, "reorders": len(calls),
                     "kv_bytes_per_step": statistics.fmean(c["kv"] for c in calls),
                     "summary_bytes_per_step": statistics.fmean(c["summaries"] for c in calls),
                     "estimate_bytes_per_step": statistics.fmean(c["estimates"] for c in calls),
                     "reorder_ms": 1e3 * statistics.median(c["seconds"] for c in calls),
                     "generate_s": time.perf_counter() - start})
    dense, shared = rows
    shared["kv_vs_dynamic"] = shared["kv_bytes_per_step"] / dense["kv_bytes_per_step"]
    shared["all_vs_dynamic"] = (shared["kv_bytes_per_step"] + shared["summary_bytes_per_step"]
                                + shared["estimate_bytes_per_step"]) / dense["kv_bytes_per_step"]
    shared["same_tokens"] = bool(torch.equal(outputs["dynamic"], outputs["tiercache"]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="1024,4096")
    ap.add_argument("--beams", default="2,4")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--budget", type=float, default=1.0, help="retrieval budget (1.0: exact, same tokens)")
    ap.add_argument("--device-fraction", type=float, default=0.25)
    ap.add_argument("--out", default="bench_beam")
    args = parse_args(ap)
    model = build()
    rows = []
    for context in (int(c) for c in args.contexts.split(",")):
        for beams in (int(b) for b in args.beams.split(",")):
            for row in run(model, context, beams, args.new_tokens, args.budget, args.device_fraction):
                rows.append(row)
                print(row, flush=True)
    print(f"\nbeam search reorders, 8-layer Llama shape (hidden 256, 8/2 heads), fp32, {args.new_tokens} new tokens, "
          f"budget {args.budget:g}, device {args.device_fraction:.0%} of the KV, on {machine()['device']}")
    print_table(rows, ["kind", "context", "beams", "reorders", "kv_bytes_per_step", "summary_bytes_per_step",
                       "estimate_bytes_per_step", "kv_vs_dynamic", "all_vs_dynamic", "reorder_ms",
                       "same_tokens"])
    write_results(args.out, rows, shape=TINY_LLAMA, new_tokens=args.new_tokens, budget=args.budget,
                  device_fraction=args.device_fraction)


if __name__ == "__main__":
    main()
