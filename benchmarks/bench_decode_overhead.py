"""What one decode step costs before any data moves, and what it costs on the CPU, against
DynamicCache in the same run: aten ops (GPU kernel launches), host syncs, Python time, step time.
Also the streaming append's throughput against a plain chunked prefill of the same tokens.

Model: an 8-layer Llama shape (hidden 256, 8 query heads, 2 KV heads, random weights, fp32). For
each context, the prompt is prefilled once into a DynamicCache; TieredCache imports that KV
(the device holds ``--device-fraction`` of it, the host the rest) so both decode over the same
cache. Per cache kind it reports, for one decode step:

- ``ops`` / ``ops_per_layer``: aten ops dispatched (``tiercache.opcount.OpCounter``), views
  included; ``syncs``: ops whose result the host must wait for (``.item()``, ``nonzero``, ...);
- ``step_ms`` (median of ``--steps``; the caches of one context take turns step by step, so a
  change in the machine's load hits all alike) and ``speed_vs_dynamic`` (DynamicCache's step
  time over this one's, same run);
- ``python_ms``: wall time of the step outside aten ops (measured under a timing dispatch mode);
  its slope against context length is printed at the end;
- ``read_tokens_per_layer`` and ``kv_read_bytes``: tokens each layer attends exactly per step
  (TieredCache: its ``ReadCounter``; DynamicCache: every cached token), and the KV bytes that
  makes per step over all layers, averaged over the timed steps.

A last context (``--fits-context``) has a device budget twice its KV: nothing moves, and the
rows say what tiercache costs where it should cost nothing.

    OMP_NUM_THREADS=1 python benchmarks/bench_decode_overhead.py [--contexts 4096,16384,65536]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache, LlamaForCausalLM

from common import TINY_LLAMA, dense_kv, machine, parse_args, print_table, random_llama, write_results
from tiercache import RetrievalConfig, TierConfig
from tiercache.hf.cache import TieredCache
from tiercache.spec import kv_bytes_per_token
from tiercache.opcount import OpCounter


class OpTimer(TorchDispatchMode):
    """Wall time spent inside aten ops while active (seconds)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.seconds += time.perf_counter() - start
        return out


def build() -> LlamaForCausalLM:
    return random_llama(TINY_LLAMA, max_position_embeddings=1 << 20, rope_theta=500000.0)




def tiered(model, kv: torch.Tensor, budget: float, device_fraction: float, extra_tokens: int) -> TieredCache:
    tokens = kv.shape[3] + extra_tokens
    total = kv_bytes_per_token(model) * tokens
    cfg = TierConfig(device_budget_bytes=int(total * device_fraction) + (1 << 20), host_budget_bytes=2 * total,
                     dtype=torch.float32, device="cpu", retrieval=RetrievalConfig(budget=budget))
    cache = TieredCache(model, cfg)
    cache.import_kv(kv)
    return cache


class Stepper:
    """Greedy decode steps of ``model`` on one cache."""

    def __init__(self, model, cache, token: torch.Tensor) -> None:
        self.model, self.cache, self.token = model, cache, token.clone()
        self.times: list[float] = []

    def tokens_read(self) -> int:
        """Tokens read so far, summed over layers and steps (DynamicCache: the tokens cached now
        per layer, which each later step reads whole)."""
        if isinstance(self.cache, TieredCache):
            return self.cache.step.count.read_tokens
        return self.cache.get_seq_length()

    @torch.no_grad()
    def __call__(self) -> None:
        self.token = self.model(self.token, past_key_values=self.cache, use_cache=True).logits[:, -1:].argmax(-1)

    def counts(self) -> dict:
        """Ops, syncs and Python time of one step (after a warm-up step: first-step allocations
        and lazy initialisation)."""
        self()
        with OpCounter() as counter:
            self()
        timer = OpTimer()
        start = time.perf_counter()
        with timer:
            self()
        layers = self.model.config.num_hidden_layers
        return {"ops": counter.ops, "ops_per_layer": counter.ops / layers, "syncs": counter.syncs,
                "sync_ops": dict(counter.sync_ops), "python_ms": 1e3 * (time.perf_counter() - start - timer.seconds)}

    def timed(self) -> None:
        start = time.perf_counter()
        self()
        self.times.append(time.perf_counter() - start)


@torch.no_grad()
def append_throughput(model, tokens: int, chunk: int, device_fraction: float) -> list[dict]:
    """Tokens/s of a streaming append (TieredCache, window prefill) against a plain chunked
    prefill into a DynamicCache, same tokens, same chunks."""
    ids = torch.randint(0, model.config.vocab_size, (1, tokens))
    rows = []
    for kind in ("dynamic", "tiercache-stream"):
        if kind == "dynamic":
            cache = DynamicCache(config=model.config)
        else:
            total = kv_bytes_per_token(model) * tokens
            cfg = TierConfig(device_budget_bytes=int(total * device_fraction), host_budget_bytes=2 * total,
                             dtype=torch.float32, device="cpu")
            cache = TieredCache(model, cfg, prefill="window")
        start = time.perf_counter()
        for a in range(0, tokens, chunk):
            model(ids[:, a : a + chunk], past_key_values=cache, use_cache=True)
        seconds = time.perf_counter() - start
        rows.append({"kind": kind, "tokens": tokens, "chunk": chunk, "tokens_per_s": tokens / seconds})
        if kind != "dynamic":
            cache.close()
    rows[1]["vs_chunked_prefill"] = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="4096,8192,16384,32768,65536")
    ap.add_argument("--budgets", default="1.0,0.1,0.05")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--device-fraction", type=float, default=0.25)
    ap.add_argument("--fits-context", type=int, default=512,
                    help="a context that fits the device whole (nothing moves): the overhead rows")
    ap.add_argument("--prefill-chunk", type=int, default=2048)
    ap.add_argument("--stream-tokens", type=int, default=4096)
    ap.add_argument("--stream-chunk", type=int, default=128)
    ap.add_argument("--out", default="bench_decode_overhead")
    args = parse_args(ap)
    model = build()
    model.set_attn_implementation("sdpa")
    rows = []
    plan = [(int(c), args.device_fraction) for c in args.contexts.split(",")] + [(args.fits_context, 2.0)]
    for context, fraction in plan:
        ids = torch.randint(0, model.config.vocab_size, (1, context))
        dyn = DynamicCache(config=model.config)
        with torch.no_grad():
            for a in range(0, context, args.prefill_chunk):
                out = model(ids[:, a : a + args.prefill_chunk], past_key_values=dyn, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        kv = dense_kv(dyn)
        fits = fraction > 1
        kinds = {"dynamic": Stepper(model, dyn, token)}
        for budget in (float(b) for b in args.budgets.split(",")):
            kinds[f"tiercache-{budget:g}"] = Stepper(model, tiered(model, kv, budget, fraction, args.steps + 8), token)
        found = {}
        for kind, stepper in kinds.items():
            found[kind] = stepper.counts()
        read_before = {kind: stepper.tokens_read() for kind, stepper in kinds.items()}
        # One step of each cache in turn, so that a change in the machine's load hits all alike.
        for _ in range(args.steps):
            for stepper in kinds.values():
                stepper.timed()
        layers = model.config.num_hidden_layers
        for kind, stepper in kinds.items():
            after = stepper.tokens_read()
            # DynamicCache: step i of n reads the (before + i + 1) tokens cached by then, at every layer.
            per_layer = ((read_before[kind] + after + 1) / 2 if kind == "dynamic"
                         else (after - read_before[kind]) / args.steps / layers)
            row = {"kind": kind, "context": context, "fits": fits, **found[kind],
                   "step_ms": 1e3 * statistics.median(stepper.times), "read_tokens_per_layer": per_layer,
                   "kv_read_bytes": per_layer * kv_bytes_per_token(model)}
            if kind != "dynamic":
                row["speed_vs_dynamic"] = 1e3 * statistics.median(kinds["dynamic"].times) / row["step_ms"]
                stepper.cache.close()
            rows.append(row)
            print(row, flush=True)
        del dyn, kinds
    print(f"\none decode step, 8-layer Llama shape (hidden 256, 8/2 heads), fp32, on {machine()['device']}, "
          f"device {args.device_fraction:.0%} of the KV")
    print_table(rows, ["kind", "context", "fits", "ops", "ops_per_layer", "syncs", "python_ms", "step_ms",
                       "speed_vs_dynamic", "read_tokens_per_layer"])
    slopes = {}
    for kind in dict.fromkeys(r["kind"] for r in rows):
        pts = [(r["context"], r["python_ms"]) for r in rows if r["kind"] == kind and not r["fits"]]
        if len(pts) > 1:
            xs, ys = zip(*pts)
            mx, my = statistics.fmean(xs), statistics.fmean(ys)
            slopes[kind] = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x in xs) * 1024
    print("python time slope (ms per 1K tokens of context): "
          + ", ".join(f"{k} {v:+.4f}" for k, v in slopes.items()))
    stream = append_throughput(model, args.stream_tokens, args.stream_chunk, args.device_fraction)
    print_table(stream, ["kind", "tokens", "chunk", "tokens_per_s", "vs_chunked_prefill"])
    write_results(args.out, rows, stream=stream, python_slope_ms_per_1k=slopes,
                  device_fraction=args.device_fraction, shape=TINY_LLAMA, steps=args.steps)


if __name__ == "__main__":
    main()
