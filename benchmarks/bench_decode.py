"""Decode tokens/s and KV bytes against context length: dense caches vs tiercache.

A randomly initialised Llama-architecture model (speed needs no trained weights) gets a cache of
N tokens of random KV, written straight into each cache (a real prefill of 1M tokens would take
hours and is not what is measured), then decodes ``--steps`` tokens; the median step is
reported for
- ``dynamic``: transformers' DynamicCache, dense attention (the baseline of every ratio);
- ``offloaded``: ``DynamicCache(offloading=True)`` (CUDA only: it moves whole layers to the GPU);
- ``quantized``: transformers' QuantizedCache, if a backend (quanto) is installed;
- ``tiercache-5%`` / ``tiercache-10%``: TieredCache with the device holding ``--device-fraction``
  of the KV, the host the rest, and read budgets of 5% / 10% of the context.
A cache that does not fit is reported as such (dense at 1M tokens on one GPU), not skipped.
On a CPU only ratios against ``dynamic`` in the same run mean anything; on a GPU the absolute
tokens/s and GiB are reported too, with the device named.

    python benchmarks/bench_decode.py [--shape small|llama3-8b] [--contexts 2048,4096,...] [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import psutil
import torch
from transformers import DynamicCache, LlamaForCausalLM

from common import machine, parse_args, print_table, random_llama, write_results
from tiercache import RetrievalConfig, TierConfig, TierName
from tiercache.hf.cache import TieredCache
from tiercache.spec import kv_bytes_per_token

SHAPES = {
    # SmolLM2-135M's attention geometry with fewer layers, so CPU runs stay short.
    "small": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=9,
                  num_key_value_heads=3, vocab_size=4096),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256),
}
#: Tokens of random KV written per call while filling a cache (bounds the temporary tensors).
_FILL_CHUNK = 1 << 14


def build(shape: str, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    return random_llama(SHAPES[shape], max_position_embeddings=1 << 21, rope_theta=500000.0).to(device=device,
                                                                                              dtype=dtype)


def random_layers(model, tokens: int):
    """Each layer's random KV ``(2, kv_heads, tokens, head_dim)`` on the model's device, in order."""
    c = model.config
    shape = (2, c.num_key_value_heads, tokens, c.hidden_size // c.num_attention_heads)
    gen = torch.Generator(device=model.device).manual_seed(1)
    for _ in range(c.num_hidden_layers):
        yield torch.randn(shape, generator=gen, device=model.device, dtype=model.dtype)


def make_cache(kind: str, model, context: int, device_fraction: float):
    if kind == "dynamic":
        return DynamicCache(config=model.config)
    if kind == "offloaded":
        return DynamicCache(config=model.config, offloading=True)
    if kind == "quantized":
        from transformers import QuantizedCache

        return QuantizedCache(backend="quanto", config=model.config)
    budget = {"tiercache-5%": 0.05, "tiercache-10%": 0.10}[kind]
    total = kv_bytes_per_token(model) * (context + 64)
    device = int(total * device_fraction)
    # The host takes the rest, within what this machine has (the config refuses more).
    host = min(total - device + (64 << 20), int(psutil.virtual_memory().available * 0.9))
    cfg = TierConfig(device_budget_bytes=device, host_budget_bytes=host, block_tokens=32, dtype=model.dtype,
                     retrieval=RetrievalConfig(budget=budget))
    return TieredCache(model, cfg)


def fill(cache, model, context: int) -> None:
    """Write ``context`` tokens of random KV into ``cache`` without a forward."""
    if isinstance(cache, TieredCache):
        cache.import_kv(random_layers(model, context))
        return
    for layer, kv in enumerate(random_layers(model, context)):
        cache.update(kv[0][None], kv[1][None], layer)


def cache_bytes(cache) -> int:
    """KV bytes a transformers cache holds in its fast tier (quantized tensors included)."""
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            t = getattr(layer, name, None)
            if t is not None and hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor:
                total += sum(getattr(t, n).numel() * getattr(t, n).element_size() for n in t.__tensor_flatten__()[0])
            elif t is not None:
                total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def run(kind: str, model, context: int, steps: int, device_fraction: float) -> dict:
    row = {"kind": kind, "context": context}
    cuda = torch.cuda.is_available()
    try:
        cache = make_cache(kind, model, context, device_fraction)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        fill(cache, model, context)
        token = torch.zeros(1, 1, dtype=torch.long, device=model.device)
        times = []
        for _ in range(steps + 1):  # the first step warms up
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    except (torch.OutOfMemoryError, RuntimeError, ImportError) as exc:  # does not fit, or no backend
        return {**row, "error": f"{type(exc).__name__}: {exc}"[:100]}
    row["step_s"] = statistics.median(times[1:])
    if isinstance(cache, TieredCache):
        s = cache.manager.stats()
        row["device_kv_GiB"] = cache.manager.capacity_bytes(TierName.DEVICE) / 2**30
        row["device_hit_rate"] = s.hits["device"] / max(1, s.lookups)
        row["attended"] = cache.attended_fraction
        cache.close()
    else:
        row["device_kv_GiB"] = cache_bytes(cache) / 2**30
    if cuda:
        row["peak_gpu_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b" if torch.cuda.is_available() else "small")
    ap.add_argument("--contexts", default="2048,8192,32768")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--device-fraction", type=float, default=0.25)
    ap.add_argument("--kinds", default="dynamic,offloaded,quantized,tiercache-5%,tiercache-10%")
    ap.add_argument("--out", default="bench_decode")
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
            row = run(kind, model, context, args.steps, args.device_fraction)
            if kind == "dynamic":
                base = row.get("step_s")
            if base and "step_s" in row:
                row["speed_vs_dense"] = base / row["step_s"]
            if "step_s" in row:
                row["tokens_per_s"] = 1.0 / row["step_s"]
            rows.append(row)
            print(row, flush=True)
    print(f"\ndecode step, {args.shape} shape, on {machine()['device']}, device {args.device_fraction:.0%} of the KV")
    print_table(rows, ["kind", "context", "step_s", "speed_vs_dense", "tokens_per_s", "device_kv_GiB",
                       "device_hit_rate", "attended"] + (["peak_gpu_GiB"] if device.type == "cuda" else []) + ["error"])
    write_results(args.out, rows, shape=args.shape, steps=args.steps, device_fraction=args.device_fraction)


if __name__ == "__main__":
    main()
