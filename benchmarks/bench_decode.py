"""Decode step time and device KV bytes against context length: full attention vs tiercache.

A randomly initialised Llama-architecture model (speed needs no trained weights) is prefilled
with a context of N tokens, then decodes a few tokens; the median step time is reported for
- ``dynamic``: transformers' DynamicCache, full attention (the baseline of every ratio);
- ``offloaded``: ``DynamicCache(offloading=True)`` (CUDA only: it moves whole layers to the GPU);
- ``quantized``: transformers' QuantizedCache, if a backend (quanto / hqq) is installed;
- ``tiercache-5%`` / ``tiercache-10%``: TieredCache with the device holding 25% of the KV and
  retrieval budgets of 5% / 10% of the context.
On a CPU only ratios against ``dynamic`` in the same run mean anything; on a GPU the absolute
tokens/s and GiB are reported too, with the device named.

    python benchmarks/bench_decode.py [--shape small|llama3-8b] [--contexts 2048,4096,...] [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from common import machine, parse_args, print_table, write_results
from tiercache import RetrievalConfig, TierConfig
from tiercache.cache import TieredCache

SHAPES = {
    # SmolLM2-135M's attention geometry with fewer layers, so CPU runs stay short.
    "small": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=9,
                  num_key_value_heads=3, vocab_size=4096),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256),
}


def build(shape: str, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=1 << 21, rope_theta=500000.0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def kv_bytes(model, tokens: int) -> int:
    c = model.config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) \
        * model.dtype.itemsize * tokens


def make_cache(kind: str, model, context: int):
    if kind == "dynamic":
        return DynamicCache(config=model.config)
    if kind == "offloaded":
        return DynamicCache(config=model.config, offloading=True)
    if kind == "quantized":
        from transformers import QuantizedCache

        return QuantizedCache(backend="quanto", config=model.config)
    budget = {"tiercache-5%": 0.05, "tiercache-10%": 0.10}[kind]
    total = kv_bytes(model, context + 64)
    cfg = TierConfig(device_budget_bytes=total // 4, host_budget_bytes=2 * total, block_tokens=32,
                     dtype=model.dtype, retrieval=RetrievalConfig(budget=budget))
    return TieredCache(model, cfg)


def tensor_bytes(t) -> int:
    """Bytes held by ``t``, looking inside tensor subclasses (quanto's packed tensors)."""
    if t is None:
        return 0
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor:
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def cache_bytes(cache) -> int:
    """KV bytes a transformers cache holds: full-precision tensors plus quantized ones."""
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            total += tensor_bytes(getattr(layer, name, None))
    return total


@torch.no_grad()
def run(kind: str, model, context: int, steps: int, prefill_chunk: int) -> dict:
    device = model.device
    ids = torch.randint(0, model.config.vocab_size, (1, context), device=device)
    model.set_attn_implementation("sdpa")
    try:
        cache = make_cache(kind, model, context)
    except Exception as exc:  # a missing optional backend is reported, not fatal
        return {"kind": kind, "context": context, "error": f"{type(exc).__name__}: {exc}"[:120]}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for start in range(0, context, prefill_chunk):
        out = model(ids[:, start : start + prefill_chunk], past_key_values=cache, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = model(nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    row = {"kind": kind, "context": context, "step_s": statistics.median(times)}
    if isinstance(cache, TieredCache):
        s = cache.manager.stats()
        row["device_kv_MiB"] = s.peak_bytes["device"] / 2**20
        row["device_hit_rate"] = s.hits["device"] / max(1, s.lookups)
        cache.close()
    else:
        row["device_kv_MiB"] = cache_bytes(cache) / 2**20
    if torch.cuda.is_available():
        row["peak_gpu_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b" if torch.cuda.is_available() else "small")
    ap.add_argument("--contexts", default="2048,4096,8192,16384,32768")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prefill-chunk", type=int, default=2048)
    ap.add_argument("--kinds", default="dynamic,offloaded,quantized,tiercache-5%,tiercache-10%")
    args = parse_args(ap)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(args.shape, device, dtype)
    rows = []
    for context in [int(c) for c in args.contexts.split(",")]:
        base = None
        for kind in args.kinds.split(","):
            if kind == "offloaded" and device.type != "cuda":
                continue  # it only differs from `dynamic` when there is a GPU to offload from
            row = run(kind, model, context, args.steps, args.prefill_chunk)
            if kind == "dynamic":
                base = row.get("step_s")
            if base and "step_s" in row:
                row["speed_vs_full"] = base / row["step_s"]
                if device.type == "cuda":
                    row["tokens_per_s"] = 1.0 / row["step_s"]
            rows.append(row)
            print(row, flush=True)
    print(f"\ndecode step, {args.shape} shape, on {machine()['device']}")
    print_table(rows, ["kind", "context", "step_s", "speed_vs_full", "device_kv_MiB", "device_hit_rate"]
                + (["tokens_per_s", "peak_gpu_GiB"] if device.type == "cuda" else []))
    write_results("bench_decode", rows, shape=args.shape, steps=args.steps)


if __name__ == "__main__":
    main()
